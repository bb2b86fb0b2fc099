"""DeepSim-AE on the 2D cross-contrast slices (T2 / FLAIR / T1c -> T1), lambda-conditioned, as a comparison row.

Paper: Czolbe et al., "DeepSim", MIDL 2021 (method ``jaxreg/methods/deepsim.py``).
Needs ``configs/deepsim_features_brain2d.py``. Command::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python -m train.main \\
        --config configs/deepsim_brain2d.py --workdir runs/deepsim_ae_2d

Same network, data, steps and batch as ``configs/contrareg_brain2d.py``.
DeepSim is a mono-modal method (one extractor for both images, eq. 5); on
cross-contrast pairs it is measured, not expected, to work: 2000 steps in
17 min (2026-12-03, 2 cores, beside another run), held-out EPE 3.86 -> 3.59 mm
at lambda 0.8, the last row of ``benchmarks/results/crossreg_table.md``.
"""
import ml_collections

from configs import contrareg_brain2d as cr
from configs import contrareg_features_brain2d as fb


def get_config() -> ml_collections.ConfigDict:
    c = fb.base("deepsim")
    c.update(cr.STEPS)
    net = {k: v for k, v in cr.NETWORK.items()}
    c.model = ml_collections.ConfigDict(dict(
        net, norm=False, features_checkpoint="runs/deepsim_features_brain2d", feature_head="ae",
        feature_widths=(32, 64, 128), feature_classes=0, reg_scale=1.0, reg_weight=1.0))
    c.data = cr.crossreg_data()
    return c
