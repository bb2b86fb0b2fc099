"""DeepSim's auto-encoder feature extractor in 3D at 4 mm (the paper's 3D widths 32-64-128), for deepsim_brain3d.

Command::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python -m train.main \\
        --config configs/deepsim_features_brain3d.py --workdir runs/deepsim_features_brain3d

Measured (2026-12-03, session 21): ``--config.num_train_steps=100 --config.eval_every=100`` took 31 min on
the 2 cores beside other runs (0.04-0.08 steps/s at batch 1 over the four contrasts' volumes), validation
reconstruction MSE 0.0153. Used by configs/deepsim_brain3d.py.
"""
import ml_collections

from configs import contrareg_features_brain3d as f3


def get_config() -> ml_collections.ConfigDict:
    c = f3.get_config()
    c.model.kind = "deepsim_ae"
    c.model.features = ()  # the paper's 3D widths
    c.batch_size = 1
    return c
