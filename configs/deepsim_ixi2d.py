"""DeepSim on mono-contrast IXI inter-subject T1 slices at 2 mm (DeepSim-seg / DeepSim-AE vs MSE and NCC).

Paper: Czolbe et al., "DeepSim", MIDL 2021 (brain-MRI: DeepSim-seg 0.675 /
DeepSim-AE 0.671 Dice vs MSE 0.666 / NCC 0.657, with less folding than NCC).
Needs ``configs/deepsim_features_ixi2d.py``. Commands::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python -m train.main \\
        --config configs/deepsim_ixi2d.py --workdir runs/deepsim_seg_ixi2d
    ... --config.model.feature_head=ae --config.model.feature_classes=0 \\
        --config.model.features_checkpoint=runs/deepsim_features_ixi2d_ae --workdir runs/deepsim_ae_ixi2d

Baselines, same network, data, steps and batch: ``configs/vxm_ixi2d.py``
(MSE, NCC). Data (``data.kind = "car"``, T1 only): inter-subject pairs of
random axial slices of MNI152 and IXI 014, 015, 033, 034, 039, both images
randomly deformed (mean 2 voxels) and flipped; held out: IXI012 <-> IXI013
(8 slices each way, 148 labels: Dice). Lambda-conditioned, evaluated over 17
lambdas by ``benchmarks/crossreg_table.py --config configs/deepsim_ixi2d.py``.

Measured (2026-12-03, session 21, 2 cores; ``benchmarks/results/deepsim_ixi2d.md``, 32 held-out slice
pairs, mono Dice 0.388 before). Extractors (configs/deepsim_features_ixi2d.py, 600 steps, ~12 min each
beside other runs): segmentation held-out Dice 0.095, auto-encoder validation MSE 0.0023. Networks: 1000
steps of batch 8 (~5-10 min each beside other runs), ``reg_scale`` 0.01 for DeepSim and MSE (this config's
default), 1 for NCC. Best mono Dice over the 17 lambdas, no folding anywhere (SDlogJ): VXM-NCC 0.435 (0.24),
DeepSim-AE 0.431 (0.35), DeepSim-seg 0.419 (0.39), VXM-MSE 0.419 (0.53); io-mind 0.394 (0.16). The paper's
order (seg 0.675 > AE 0.671 > MSE 0.666 > NCC 0.657, DeepSim with less folding than NCC) is not
reproduced: DeepSim-AE beats MSE (+0.012) but not NCC, the barely trained segmentation extractor gives no
gain over MSE, and NCC has the smoothest fields. On the sin-remapped pairs (not a DeepSim claim: its
extractors saw only T1) NCC keeps 0.29-0.39, the feature losses drop to 0.26-0.28. With ``reg_scale`` 1
(2026-12-02, ``deepsim_ixi2d_regscale1.md``) every network had stayed near the identity (0.387-0.393).
"""
import ml_collections

from configs import contrareg_brain2d as cr
from configs import contrareg_features_brain2d as fb
from configs import deepsim_features_ixi2d as fi


def ixi_data() -> ml_collections.ConfigDict:
    d = fb.get_config().data
    return ml_collections.ConfigDict(dict(
        kind="car", root=d.root, resolution=2.0, crop=(96, 112, 96), train_cases=("mni152", *fi.IXI_TRAIN),
        test_cases=(), label_cases=fi.IXI_VAL, mode="inter", slice_axis=2, deform_voxels=2.0, deform_spacing=16,
        deform_fixed=True, flip=True, num_val=8))


def get_config() -> ml_collections.ConfigDict:
    c = fb.base("deepsim")
    c.num_train_steps = 1000
    c.eval_lambda = 0.1
    c.model = ml_collections.ConfigDict(dict(
        cr.NETWORK, norm=False, features_checkpoint="runs/deepsim_features_ixi2d_seg", feature_head="seg",
        feature_widths=(32, 64, 128), feature_classes=149, reg_scale=0.01, reg_weight=1.0))
    # reg_scale 0.01: 1 - DeepSim changes by ~0.005 between the identity and a good alignment, and with reg_scale 1
    # the networks stayed at the identity (2026-12-02: Dice 0.391 / 0.393 against 0.387 before)
    c.data = ixi_data()
    return c
