"""DeepSim-AE in 3D at 4 mm on the cross-contrast volumes (T2 / FLAIR / T1c -> T1), lambda-conditioned.

Needs ``configs/deepsim_features_brain3d.py``. Command::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python -m train.main \\
        --config configs/deepsim_brain3d.py --workdir runs/deepsim_ae_3d

The mono-contrast IXI comparison in 3D is ``configs/deepsim_ixi3d.py``.

Measured (2026-12-03, session 21, 2 cores, beside other runs; CPU-scale runs, shorter than the defaults):
the extractor ``configs/deepsim_features_brain3d.py --config.num_train_steps=100 --config.eval_every=100``
(31 min, validation MSE 0.0153), then this config with ``--config.num_train_steps=400
--config.eval_every=200 --config.model.reg_scale=0.01`` (6 min, ~1.3 steps/s).
``benchmarks/crossreg_table.py --config configs/deepsim_brain3d.py --run DeepSim-AE=... --io-mind``
(benchmarks/results/deepsim_brain3d.md, 4 held-out volumes, EPE 8.48 mm and lesion Dice 0.240 before):
DeepSim-AE 8.19 mm / Dice 0.235 at its best lambda (1), against io-mind 1.28 mm / 0.856. At 400 steps the
network has barely moved. DeepSim-AE is mono-modal by design, and in 2D it was also the weakest
cross-contrast row (benchmarks/results/crossreg_table.md).
"""
import ml_collections

from configs import contrareg_brain3d as c3
from configs import deepsim_brain2d as d2


def get_config() -> ml_collections.ConfigDict:
    c = d2.get_config()
    c.model.ndim = 3
    c.model.feature_widths = ()
    c.model.features_checkpoint = "runs/deepsim_features_brain3d"
    c.batch_size = 1
    c.num_train_steps = 600
    c.data = c3.get_config().data
    return c
