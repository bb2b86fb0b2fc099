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

Measured (2026-12-02, ``benchmarks/results/deepsim_ixi2d.md``, 1000 steps of batch 8, ~5 min each): Dice
(mono) 0.387 before, DeepSim-seg 0.391, DeepSim-AE 0.393, MSE 0.387, NCC 0.390, io-mind 0.396; no folding.
Not the paper's separation (0.675 / 0.671 vs 0.666 / 0.657): the networks barely moved at this budget.
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
        feature_widths=(32, 64, 128), feature_classes=149, reg_scale=1.0, reg_weight=1.0))
    c.data = ixi_data()
    return c
