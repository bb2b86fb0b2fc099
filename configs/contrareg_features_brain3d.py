"""ContraReg's modality-specific autoencoders in 3D at 4 mm (whole volumes), for ``configs/contrareg_brain3d.py``.

Command::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python -m train.main \\
        --config configs/contrareg_features_brain3d.py --workdir runs/contrareg_features_brain3d

Same cases as the 2D config (``configs/contrareg_features_brain2d.py``); each
example is a whole 48x64x48 volume, flipped. Four 3D autoencoders train per
step, at ~25-40 s per step on the 2 cores.

Measured (2026-12-03, session 22, 2 cores, beside other work; a CPU-scale run
shorter than the default 500 steps): ``--config.num_train_steps=120
--config.checkpoint_every=60 --config.eval_every=120`` took 75 min and reached
validation reconstruction 0.046 (training reconstruction 0.23 at step 10). The registration network on
these features: ``configs/contrareg_brain3d.py``.
"""
import ml_collections

from configs import contrareg_features_brain2d as fb


def to_3d(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A 2D config of these cases made 3D: whole 48x64x48 volumes at 4 mm, one validation volume per case."""
    c.model.ndim = 3
    c.data.resolution = 4.0
    c.data.crop = (48, 64, 48)
    c.data.slice_axis = -1
    c.data.num_val = 1
    return c


def get_config() -> ml_collections.ConfigDict:
    c = to_3d(fb.get_config())
    c.batch_size = 2
    c.num_train_steps = 500
    return c
