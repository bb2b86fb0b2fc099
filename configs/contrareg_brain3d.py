"""mCR in 3D at 4 mm: T2 / FLAIR / T1c -> T1 volumes, lambda-conditioned (ContraReg, MICCAI 2022).

Needs ``configs/contrareg_features_brain3d.py``. Command::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python -m train.main \\
        --config configs/contrareg_brain3d.py --workdir runs/mcr_brain3d
    jaxreg register --fixed t1.nii.gz --moving t2.nii.gz --out out/ --method contrareg \\
        --checkpoint runs/mcr_brain3d --lambda 0.1

Data as ``configs/contrareg_brain2d.py`` on whole 48x64x48 volumes at 4 mm
(held-out volumes with known deformations). ~1.1 steps/s on the 2 cores.

Measured (2026-12-03, session 22; CPU-scale runs on the features of
``configs/contrareg_features_brain3d.py`` at 120 steps), ``benchmarks/crossreg_table.py --config
configs/contrareg_brain3d.py --run mCR=RUN --run VXM-MI=... --io-mind`` on 4 held-out volumes (EPE 8.48 mm
before):

- ``--config.num_train_steps=400`` (6 min): 8.48 mm, still the identity, against VXM-MI
  (``configs/vxm_crossreg3d.py``, 400 steps) 8.08 and DeepSim-AE 8.19
  (``benchmarks/results/contrareg_brain3d.md``);
- ``--config.num_train_steps=1600`` (25 min): 7.75 mm, lesion Dice 0.264 (0.240 before), no folding, against
  VXM-MI at 1600 steps 8.36 mm (``benchmarks/results/contrareg_brain3d_1600.md``).

io-mind on the same volumes reaches 1.29 mm. The trained PatchNCE distance is lowest at the true alignment
of a held-out T2/FLAIR -> T1 pair, and its basin deepens with training
(``docs/experiments/issue14_controlled.md``).
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
