"""The VXM baseline of the 3D cross-contrast comparison: ``configs/vxm_crossreg2d.py`` on whole volumes at 4 mm.

Same network, data, lambda conditioning, steps and batch as
``configs/contrareg_brain3d.py`` (T2 / FLAIR / T1c -> T1 volumes, 48x64x48 at
4 mm, batch 1). Command (MI, the best 2D baseline; other similarities with
``--config.model.similarity=``)::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python -m train.main \\
        --config configs/vxm_crossreg3d.py --workdir runs/vxm_mi_3d

Measured (2026-12-03, session 22, ~2.8 steps/s on the 2 cores), 4 held-out volumes, EPE 8.48 mm before:
400 steps 8.08 mm, 1600 steps 8.36 mm (one seed each; ``benchmarks/results/contrareg_brain3d.md`` and
``contrareg_brain3d_1600.md``, beside mCR).
"""
import ml_collections

from configs import contrareg_brain3d as c3
from configs import vxm_crossreg2d as v2


def get_config() -> ml_collections.ConfigDict:
    c = v2.get_config()
    c.model.ndim = 3
    c.data = c3.get_config().data
    c.batch_size = c3.get_config().batch_size
    c.num_train_steps = c3.get_config().num_train_steps
    return c
