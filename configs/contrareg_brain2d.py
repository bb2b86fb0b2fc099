"""ContraReg (mCR) on 2D cross-contrast slices at 2 mm: T2 / FLAIR / T1c -> T1, lambda-conditioned.

Paper: Dey et al., "ContraReg", MICCAI 2022 (method ``jaxreg/methods/contrareg.py``).
Needs the autoencoders of ``configs/contrareg_features_brain2d.py``. Commands::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python -m train.main \\
        --config configs/contrareg_brain2d.py --workdir runs/mcr_brain2d
    ... --config.model.masked=False --workdir runs/cr_brain2d          # CR (no foreground mask)

The comparison (same network, data, steps and batch; ``configs/vxm_crossreg2d.py``
for the VXM baselines, ``configs/deepsim_brain2d.py`` for DeepSim-AE) is
evaluated over 17 lambdas by ``benchmarks/crossreg_table.py``.

Data (``data.kind = "crossreg"``, ``train/train.py:build_crossreg_data``):
training cases brats_space tcga_fg6692 and brats_gli_00001, ms_mni
patient07 (skull-stripped, affinely aligned to the first, 2 mm, 96x112 axial
slices); fixed = T1, moving = T2, FLAIR or T1c (one per batch) of the same
subject, deformed by a random smooth field (mean 2 voxels). Held out: ms_mni
patient19 (T2, FLAIR, T1c, lesion labels) and ixi_t2 IXI002 (T2), 8 slices
each, each moving slice warped by a known field (endpoint error in mm; lesion
Dice). Same-subject pairs with an undeformed fixed image were measured to
train better than 30 % inter-subject pairs with both images deformed
(docs/experiments/issue14_controlled.md, "Pairs").

Paper-scale settings (Sec. 4): U-Net width 64 everywhere, 5 integration
steps, Adam 5e-5 for 1e5 iterations, ns = 1024, tau = 0.007, alpha = 0.1.
CPU scale here: VoxelMorph's widths with a half-resolution decoder
(``out_level=1``, as every CPU-trained network of this project), ns = 256
sampled locations per layer (1024 ran at 0.28 steps/s, 256 at ~1), Adam
1e-3 with a cosine decay, batch 8, 2000 steps.

Measured (2026-12-03, 2 cores, two runs side by side, ``benchmarks/results/crossreg_table.md``):
features 1500 steps in 16 min (held-out L1 0.053); mCR 2000 steps in 66 min (~0.5 steps/s beside another run),
CR 58 min; 32 held-out pairs, EPE 3.86 mm and lesion Dice 0.544 before: mCR 2.76 mm / Dice 0.651 (lambda 0.3),
CR 2.97 / 0.624, VXM-MI 2.84 / 0.632, MIND 3.00 / 0.600, local MI 3.10 / 0.595, NGF 3.15 / 0.584, DeepSim-AE
3.59 / 0.563, io-mind 0.88 / 0.888; no folding. mCR >= CR and mCR > the best baseline hold (the latter by
0.08 mm, within the spread between evaluations); CR > the best baseline does not.
"""
import ml_collections

from configs import contrareg_features_brain2d as fb


def crossreg_data() -> ml_collections.ConfigDict:
    """The training / held-out data of every row of the cross-contrast comparison."""
    d = fb.get_config().data
    return ml_collections.ConfigDict(dict(
        kind="crossreg", root=d.root, resolution=2.0, crop=(96, 112, 80), train_cases=fb.TRAIN_CASES,
        val_cases=fb.VAL_CASES, fixed_contrast="t1", moving_contrasts=("t2", "flair", "t1c"),
        deform_voxels=2.0, deform_spacing=16, slice_axis=2, flip=True, num_val=8,
        # same-subject pairs with only the moving image deformed: 2.84 mm held out at 4000 steps against 3.21 mm with
        # 30 % inter-subject pairs and a deformed fixed image (docs/experiments/issue14_controlled.md, "Pairs")
        inter_prob=0.0, deform_fixed=False,
        # controlled experiments (issue 14; train/train.py:build_crossreg_data): keep the true field (for
        # model.supervised), remap the fixed image ("sin": synthetic contrast, exact anatomy)
        keep_truth=False, remap_fixed="", keep_target=False, val_contrasts=(),
        synthetic_cases=()))


# the comparison's budget, shared by every row (mCR, CR, the VXM baselines, DeepSim-AE):
# the table of benchmarks/results/crossreg_table.md
STEPS = dict(num_train_steps=2000, eval_every=1000, eval_lambda=0.1)

NETWORK = dict(ndim=2, in_channels=1, enc_features=(16, 32, 32, 32), dec_features=(32, 32, 32, 32),
               final_features=(32, 16, 16), out_level=1, int_steps=5, int_downsize=2, hyper=True,
               lambda_range=(0.0, 1.0))


def get_config() -> ml_collections.ConfigDict:
    c = fb.base("contrareg")
    c.update(STEPS)
    c.model = ml_collections.ConfigDict(dict(
        NETWORK, contrasts=fb.CONTRASTS, features_checkpoint="runs/contrareg_features_brain2d",
        ae_features=(32, 64, 128, 64, 32, 32, 32), num_feature_layers=6, mlp_features=256, mlp_layers=3,
        num_samples=256, temperature=0.007, masked=True, mask_threshold=0.05, alpha=0.1, reg_weight=1.0))
    c.data = crossreg_data()
    return c
