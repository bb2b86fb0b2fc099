"""2D VoxelMorph-style SVF network on axial slices of the brats_space contrasts (T2 -> T1, MIND loss).

Command (from the repository root)::

    .venv/bin/python -m train.main --config configs/vxm_brats2d.py --workdir runs/vxm_brats2d

Data: ``$JAXREG_DATA/brats_space`` (2 co-registered glioma cases). Train on
the first case, validate on the second. A training example is a random
axial slice (central half of the brain) at 2 mm: fixed = T1, moving = T2 of
the same slice warped by a random smooth deformation (mean 2 voxels = 4
mm); the network must undo it across contrasts.

Runtime and result, measured on 2 CPU cores (2026-11-30, the code of commit
c0219b0 with this config: half-resolution decoder, loss_sigma 1, single-scale
loss, i.e. ``--config.model.loss_scales=1`` now): 1000 steps in 2017 s wall
while sharing the machine with an IXI training run (so an upper bound).
Training MIND-SSC loss (mean of the first / last five logged values) 0.059 ->
0.050 (-15 %), validation 0.000 % folding, SDlogJ 0.046. Endpoint error
against the known deformation (``val_epe_mm``, 32 validation slices of the
second case, fixed-image foreground): 4.04 -> 3.58 mm (-11 %); io-mind
(``InstanceConfig(affine=False)``) on the first 8 of those slices: 4.15 ->
1.05 mm (-75 %). NOT a useful registration network yet; see docs/design.md
("what the CPU runs learned") for why: with ``reg_weight=0.02`` the network's
fields make the error worse (4.18 -> 5.29 mm after 300 steps), and even a
supervised regression of the true field stays at 3.7-4.1 mm over 1500 steps,
while mono-contrast training (``--config.data.moving_contrast=t1``, 750
steps, batch 4, constant lr 1e-3, reg_weight 0.02) reaches 4.15 -> 1.90 mm.
"""
import os

import ml_collections

from configs import vxm_ixi


def get_config() -> ml_collections.ConfigDict:
    c = vxm_ixi.get_config()
    c.num_train_steps = 1000
    c.batch_size = 8
    c.eval_every = 200
    c.model.ndim = 2
    c.data = ml_collections.ConfigDict(dict(
        source="brats_space", root=os.environ.get("JAXREG_DATA", "../shared/data"), manifest="",
        contrasts=("t1", "t2"), resolution=2.0, prealign=False, mode="intra", fixed_contrast="t1",
        moving_contrast="t2", deform_voxels=2.0, deform_fixed=False, deform_spacing=16, flip=False, remap_fixed="", train_subjects="0:1", val_subjects="1:2",
        val_remaps=("",), crop=(), slice_axis=2, num_val=8))
    return c
