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

Runtime and result, measured on 2 CPU cores (2026-11-30), NOT yet the intended result:
at 2 mm (128x128x96) one train step takes ~20 s (U-Net step at 96x112x96: 14.2 s,
benchmarks/results/train_step.md), so the 2000 steps here need ~11 h on such a
machine (minutes on a GPU). A CPU run at 3 mm
(``--config.data.resolution=3.0 --config.num_train_steps=400 --config.model.reg_weight=0.02``,
6.3 s/step, 400 steps in 43 min) had learned almost no Dice gain on the validation
pairs (affine 0.461 -> network 0.462 mono / 0.463 cross, 0 % folding; io-mind 0.532 /
0.523 on the same pairs; benchmarks/results/learned_vs_io.md). ``reg_weight`` is
not swept yet.
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
        ndim=3, in_channels=1, enc_features=(16, 32, 32, 32), dec_features=(32, 32, 32, 32),
        final_features=(32, 16, 16), norm=False, out_level=1, int_steps=7, int_downsize=2, bidirectional=False,
        similarity="mind", loss_sigma=1.0, loss_scales=3, loss_mask_threshold=0.05, lncc_window=9, mi_bins=32, reg_weight=1.0, hyper=False,
        lambda_range=(0.0, 1.0), lambda_distribution="uniform", reg_scale=1.0))
    c.data = ml_collections.ConfigDict(dict(
        source="ixi", root=os.environ.get("JAXREG_DATA", "../shared/data"), manifest="", contrasts=("t1",),
        resolution=2.0, prealign=True, mode="inter", fixed_contrast="t1", moving_contrast="t1",
        deform_voxels=0.0, remap_fixed="random", remap_prob=0.5, loss_on_original_fixed=True, train_subjects="0:5", val_subjects="5:7",
        val_remaps=("", "sin"), crop=(), slice_axis=-1, num_val=4))
    return c
