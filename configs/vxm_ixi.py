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

Runtime and result: see the "Status" paragraph of docs/design.md
(measured on 2 CPU cores; updated by whoever runs it).
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
        final_features=(32, 16, 16), norm=False, int_steps=7, int_downsize=2, bidirectional=False,
        similarity="mind", lncc_window=9, mi_bins=32, reg_weight=1.0, hyper=False,
        lambda_range=(0.0, 1.0), lambda_distribution="uniform", reg_scale=1.0))
    c.data = ml_collections.ConfigDict(dict(
        source="ixi", root=os.environ.get("JAXREG_DATA", "../shared/data"), manifest="", contrasts=("t1",),
        resolution=2.0, prealign=True, mode="inter", fixed_contrast="t1", moving_contrast="t1",
        deform_voxels=0.0, remap_fixed="random", train_subjects="0:5", val_subjects="5:7",
        val_remaps=("", "sin"), crop=(), slice_axis=-1, num_val=4))
    return c
