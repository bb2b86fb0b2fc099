"""VoxelMorph-style SVF network on IXI T1 pairs at 2 mm, MIND loss, cross-contrast by random intensity remaps.

Command (from the repository root)::

    .venv/bin/python -m train.main --config configs/vxm_ixi.py --workdir runs/vxm_ixi

Data: ``$JAXREG_DATA/ixi`` (default ``../shared/data``), 7 subjects in
sorted order; train on the first 5, validate on the last 2 (pairs 5->6 and
6->5, mono-contrast and with the fixed image remapped by sin(0.9 pi x) as in
benchmarks/io_registration.py). Every subject is affinely pre-aligned to the
first one (jaxreg affine stage, MI) on a 2 mm grid padded to 128x128x96.
Training pairs are inter-subject; the fixed image gets a random
non-monotone intensity curve (a new contrast every step), so the network
and the MIND-SSC loss must work across contrasts.

Loss: MIND-SSC (radius 1, dilation 1) on Gaussian-smoothed images (sigma 1
voxel), over the target's foreground (> 0.05), averaged over 3 resolutions,
compared with the fixed T1 before its remap (``loss_on_original_fixed``; half
of the pairs are remapped, ``remap_prob``); the U-Net predicts the velocity at
half resolution (``out_level=1``). See docs/design.md for the measurements
behind each choice.

Runtime and result, measured on 2 CPU cores (2026-11-30), NOT yet the intended result:
at 2 mm (128x128x96) one train step takes ~8.5 s (~4.7 h for 2000 steps).
Longest CPU run, at 4 mm (64x64x48, ~1.1 s/step, 4000 steps in 75 min)::

    .venv/bin/python -m train.main --config configs/vxm_ixi.py --workdir runs/vxm_ixi_4mm \
        --config.data.resolution=4.0 --config.num_train_steps=4000 --config.eval_every=500 \
        --config.checkpoint_every=500 --config.model.reg_weight=0.02 --config.data.flip=True
    .venv/bin/python benchmarks/learned_vs_io.py --workdir runs/vxm_ixi_4mm --name learned_vs_io_4mm

validation Dice (4 pairs) 0.413 affine -> 0.358 / 0.413 / 0.417 / 0.418 / 0.420 / 0.435 / 0.437 / 0.443
at steps 500 ... 4000, 0 % folding. Against io-mind on the same arrays
(benchmarks/results/learned_vs_io_4mm.md): mono-contrast 0.470 vs io-mind 0.518
(54 % of io-mind's gain), cross-contrast 0.415 vs 0.492 (3 %); 0.33 s vs 3.1 s
per pair once compiled. So the network learns inter-subject T1 registration
with longer training, and not yet the cross-contrast pairs (goal: 80 %).
Earlier CPU runs at 3 mm (``--config.data.resolution=3.0 --config.num_train_steps=800
--config.eval_every=200 --config.model.reg_weight=0.02``, 2.1-2.5 s/step) were
stopped after 600 steps (~30 min): validation Dice affine 0.461 -> network
0.461 mono / 0.462 cross, 0 % folding; io-mind 0.533 / 0.524 on the same
pairs (benchmarks/results/learned_vs_io.md). Trained on a single pair, the
same network and loss reach io-mind's Dice in 100 steps. With both images
randomly deformed (``--config.data.deform_voxels=1.5
--config.data.deform_fixed=True``, 2800-step schedule) validation Dice fell
to 0.460 / 0.407 at steps 400 / 800 (stopped at 930, ~75 min): the network
lowered the training loss with fields that do not follow anatomy (on 4 IXI
pairs the loss fell 17-23 % from the identity's, io-mind's 35-45 %, with Dice
-0.04 to +0.004 vs io-mind's +0.06 to +0.13). See docs/design.md ("what the
CPU runs learned").
"""
import os

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "voxelmorph"
    c.seed = 0
    c.num_train_steps = 2000
    c.batch_size = 1
    c.num_devices = 0  # 0 = all devices
    c.learning_rate = 1e-3
    c.schedule = "cosine"
    c.warmup_steps = 50
    c.grad_clip = 1.0
    c.log_every = 10
    c.checkpoint_every = 100
    c.keep_checkpoints = 3
    c.eval_every = 250
    c.eval_lambda = 0.5
    c.quiet = False
    c.model = ml_collections.ConfigDict(dict(
        ndim=3, in_channels=1, input_features="image", enc_features=(16, 32, 32, 32), dec_features=(32, 32, 32, 32),
        final_features=(32, 16, 16), norm=False, out_level=1, int_steps=7, int_downsize=2, velocity_sigma=0.0, bidirectional=False,
        similarity="mind", loss_sigma=1.0, loss_scales=3, loss_mask_threshold=0.05, lncc_window=9, mi_bins=32, reg_weight=1.0, hyper=False,
        lambda_range=(0.0, 1.0), lambda_distribution="uniform", reg_scale=1.0))
    c.data = ml_collections.ConfigDict(dict(
        source="ixi", root=os.environ.get("JAXREG_DATA", "../shared/data"), manifest="", contrasts=("t1",),
        resolution=2.0, prealign=True, mode="inter", fixed_contrast="t1", moving_contrast="t1",
        deform_voxels=0.0, deform_fixed=False, deform_spacing=16, flip=False, remap_fixed="random", remap_prob=0.5, loss_on_original_fixed=True, train_subjects="0:5", val_subjects="5:7",
        val_remaps=("", "sin"), crop=(), slice_axis=-1, num_val=4))
    return c
