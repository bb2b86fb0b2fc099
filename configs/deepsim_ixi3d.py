"""DeepSim on mono-contrast IXI inter-subject T1 volumes at 4 mm (DeepSim-seg / DeepSim-AE vs MSE and NCC), 3D.

Paper: Czolbe et al., "DeepSim", MIDL 2021 (brain MRI, 3D: DeepSim-seg 0.675 /
DeepSim-AE 0.671 Dice vs MSE 0.666 / NCC 0.657). Needs
``configs/deepsim_features_ixi3d.py``. Commands::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python -m train.main \\
        --config configs/deepsim_ixi3d.py --workdir runs/deepsim_seg_ixi3d
    ... --config.model.feature_head=ae --config.model.feature_classes=0 \\
        --config.model.features_checkpoint=runs/deepsim_features_ixi3d_ae --workdir runs/deepsim_ae_ixi3d

Baselines, same network, data, steps and batch: ``configs/vxm_ixi3d.py``.
Data as ``configs/deepsim_ixi2d.py`` in 3D: whole volumes at 4 mm cropped to
48x64x48, inter-subject pairs with both images randomly deformed (mean 1 voxel,
control points 8 voxels apart, as ``configs/car_brain3d.py``) and flipped;
held out IXI012 <-> IXI013 (148 labels). Evaluated over 17 lambdas by
``benchmarks/crossreg_table.py --config configs/deepsim_ixi3d.py``.

Measured (2026-12-03, session 19, 2 cores, ~0.85 steps/s: 1000 steps in ~20 min;
benchmarks/results/deepsim_ixi3d.md): with the short-trained segmentation
extractor the DeepSim-seg network stays at the identity at every lambda (Dice
0.455 before and after; so does VXM-MSE), while the loss itself registers: a
dense field optimised directly with it reaches Dice 0.546 (MSE 0.529, NCC
0.541). Controlled experiments in docs/experiments/issue14_controlled.md.
The DeepSim-AE row was not run (see configs/deepsim_features_ixi3d.py).
Cause found in session 20, with VXM-MSE as the proxy (same network and
regulariser): ``reg_scale`` 1 outweighs the ~0.005 that 1 - cos (or MSE)
gains from a good alignment for every lambda above ~0.1, so the network
learns to output zero; with ``reg_scale`` 0.01 the field moves, and with a
fixed weight of 0.01 VXM-MSE beats the identity at step 200. The DeepSim rows
are to be rerun with ``--config.model.reg_scale=0.01`` (not yet measured).
"""
import ml_collections

from configs import deepsim_ixi2d as d2


def ixi_data3d() -> ml_collections.ConfigDict:
    d = d2.ixi_data()
    d.resolution = 4.0
    d.crop = (48, 64, 48)
    d.slice_axis = -1
    d.deform_voxels = 1.0
    d.deform_spacing = 8
    d.num_val = 1
    return d


# the comparison's budget, shared by the DeepSim rows and the VXM baselines (configs/vxm_ixi3d.py); 1000 steps:
# in session 18's NCC probe 1000 and 1500 steps gave the same Dice (0.472 / 0.471)
STEPS = dict(batch_size=1, num_train_steps=1000, eval_every=500, checkpoint_every=250)


def get_config() -> ml_collections.ConfigDict:
    c = d2.get_config()
    c.model.ndim = 3
    c.model.features_checkpoint = "runs/deepsim_features_ixi3d_seg"
    c.update(STEPS)
    c.data = ixi_data3d()
    return c
