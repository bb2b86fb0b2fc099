"""CAR (contrast-agnostic registration), 2D axial slices at 2 mm, trained on T1 only.

Paper: Wang et al., "CAR", WBIR 2024 (../shared/papers/car_wang2024.md);
method in ``jaxreg/methods/car.py``. Command (from the repository root)::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python -m train.main \\
        --config configs/car_brain2d.py --workdir runs/car2d

Ablations and baselines of the comparison (same data, steps and batch)::

    --config.model.contrast_weight=0            # "w/o CLR" (RC augmentation, no latent loss)
    --config.model.rc_kernel=3                  # "RC-3"
    --config.model.contrast_loss=infonce        # "CAR with InfoNCE"
    --config.model.rc_layers=0 --config.model.contrast_weight=0   # VXM-LNCC trained on T1 only

Data (``$JAXREG_DATA``, all skull-stripped and affinely aligned to MNI152 at
2 mm, :func:`jaxreg.data.car.load_brain_subjects`). Training, T1 only,
inter-subject pairs of random axial slices (central half of the brain) with
a random smooth deformation of each image (mean 2 voxels, both images, so
that 8 subjects give ever-new pairs) and random flips: MNI152, IXI 014, 015,
033, 034, 039, brats_space tcga_fg6692, ms_mni patient07. Held out (never
trained on): brats_space brats_gli_00001 and ms_mni patient19 (T1, T1c, T2,
FLAIR), ixi_t2 IXI002 (T1, T2, lined up through their headers), each with
known deformations (fixed = T1, moving = each contrast warped; endpoint
error), and IXI 012 <-> 013 (148 labels: Dice, mono-contrast and with a sin
remap of the fixed image). Evaluation of all variants and io-mind on those
pairs: ``benchmarks/car_contrasts.py``.

Paper-scale settings (Sec. 3; code Yinsong0510/CAR): widths 128 (encoders)
/ 256 (decoder), full-resolution output, batch 16, Adam 1e-4 decaying to
1e-5 over ~100 epochs of 600 images. The CPU-scale run here uses
VoxelMorph's widths, a half-resolution decoder output and Adam 1e-3 with a
cosine decay to 1e-4 over 1500 steps of batch 8 (10x the paper's rate for a
budget 1000x smaller; the paper's rate was not tried here).

Runtime and result on 2 CPU cores (2026-12-01, shared with tests and other runs, so upper bounds):
1500 steps in 22.5 min (CAR, 1351 s wall with data loading), w/o CLR 20.6, RC-3 21.9, VXM-LNCC 11.3 min.
``benchmarks/results/car_contrasts.md`` (112 held-out pairs, 8 slices per case), mean endpoint error on
the unseen contrasts (T2, FLAIR, T1c -> T1; 3.90 mm before): CAR 3.11 mm, w/o CLR 3.16, RC-3 3.33,
VXM-LNCC (T1 only) 4.86 (worse than before), io-mind 1.53; on T1 -> T1 of the same problems CAR 2.75,
VXM-LNCC 2.42, io-mind 0.33 mm. CAR's unseen EPE is 12.8 % above its T1 EPE. IXI inter-subject Dice
(148 labels, slices; 0.388 before): CAR 0.419 mono / 0.393 with the fixed image sin-remapped, VXM-LNCC
0.451 / 0.260. Folding: CAR 0.03 %, VXM-LNCC 0.99 % on the unseen contrasts.
"""
import os

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "car"
    c.seed = 0
    c.num_train_steps = 1500
    c.batch_size = 8
    c.num_devices = 0
    c.learning_rate = 1e-3
    c.schedule = "cosine"
    c.warmup_steps = 50
    c.grad_clip = 10.0
    c.log_every = 25
    c.checkpoint_every = 250
    c.keep_checkpoints = 2
    c.eval_every = 500
    c.quiet = False
    c.model = ml_collections.ConfigDict(dict(
        ndim=2, in_channels=1, enc_features=(16, 32, 32, 32), dec_features=(32, 32, 32, 32),
        final_features=(32, 16, 16), proj_features=32, out_level=1, int_steps=0, int_downsize=2,
        rc_layers=4, rc_channels=8, rc_kernel=1, rc_weight_range=(0.0, 10.0), rc_bias_std=1.0, rc_slope=0.2,
        lncc_window=9, reg_weight=0.3, contrast_weight=0.1, contrast_loss="mse", infonce_temperature=0.07))
    c.data = ml_collections.ConfigDict(dict(
        kind="car", root=os.environ.get("JAXREG_DATA", "../shared/data"), resolution=2.0, crop=(96, 112, 96),
        train_cases=("mni152", "ixi/IXI014-HH-1236", "ixi/IXI015-HH-1258", "ixi/IXI033-HH-1259",
                     "ixi/IXI034-HH-1260", "ixi/IXI039-HH-1261", "brats_space/tcga_fg6692", "ms_mni/patient07"),
        test_cases=("brats_space/brats_gli_00001", "ms_mni/patient19", "ixi_t2/IXI002"),
        label_cases=("ixi/IXI012-HH-1211", "ixi/IXI013-HH-1212"),
        mode="inter", slice_axis=2, deform_voxels=2.0, deform_spacing=16, deform_fixed=True, flip=True, num_val=2))
    return c
