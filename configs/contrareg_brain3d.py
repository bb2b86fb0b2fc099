"""mCR in 3D at 4 mm: T2 / FLAIR / T1c -> T1 volumes, lambda-conditioned (ContraReg, MICCAI 2022).

Needs ``configs/contrareg_features_brain3d.py``. Command::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python -m train.main \\
        --config configs/contrareg_brain3d.py --workdir runs/mcr_brain3d
    jaxreg register --fixed t1.nii.gz --moving t2.nii.gz --out out/ --method contrareg \\
        --checkpoint runs/mcr_brain3d --lambda 0.1

Data as ``configs/contrareg_brain2d.py`` on whole 48x64x48 volumes at 4 mm
(held-out volumes with known deformations). Not trained in a recorded run
yet (the 2D comparison came first, ``benchmarks/results/crossreg_table.md``).
"""
import ml_collections

from configs import contrareg_brain2d as cr
from configs import contrareg_features_brain3d as f3


def get_config() -> ml_collections.ConfigDict:
    c = f3.to_3d(cr.get_config())
    c.model.features_checkpoint = "runs/contrareg_features_brain3d"
    c.batch_size = 1
    c.num_train_steps = 600
    return c
