"""DNS / MASR-Net descriptors for brain MRI (the weights shipped as ``jaxreg/weights/dns_brain``), 3D at 2 mm.

Command (from the repository root)::

    .venv/bin/python -m train.main --config configs/dns_brain.py --workdir runs/dns_brain
    .venv/bin/python -m jaxreg.weights export runs/dns_brain jaxreg/weights/dns_brain

Data (``$JAXREG_DATA``, each case on its own 2 mm working grid, no
registration needed): co-registered multi-contrast cases (brats_space
brats_gli_00001, ms_mni patient07 and patient19: T1/T2/FLAIR/T1c; brats2015
pat0003-0006: FLAIR/T1c; ixi_t2 IXI002: T1 and T2 through their affines) and
single-contrast T1s (IXI033, IXI034, IXI039, MNI152) whose second view is a
Bezier-augmented copy (DNS Sec. 3.3). Validation (never trained on):
brats_space/tcga_fg6692 (T2/FLAIR/T1c vs T1) and IXI012 (T1 vs its sin
remap), the cases benchmarks/io_registration.py registers (its IXI pairs
also use IXI013-IXI015, which are not trained on either).

The paper's settings (Sec. 4.2): Adam 1e-4, batch 1, N^k = 8196 samples,
tau = 0.07, n = 3, delta = 0.5, C_d = 24; trained on 135 BraTS/iSeg cases on
V100s. Here: 48^3 crops at 2 mm, Adam 1e-3 with cosine decay (a CPU budget
of about an hour; 1e-4 is the paper's rate for a much longer run).

Measured (2026-12-01, 2 CPU cores, commit d1cd0f5's code): 2500 steps in
5581 s (93 min; ~0.5 steps/s, partly shared with other jobs). Training
InfoNCE (mean over logged steps; log 8196 = 9.0 for chance) 3.18 / 2.55 /
1.67 / 1.80 / 1.72 over steps 1-500 / -1000 / -1500 / -2000 / -2500 (top-1
retrieval 0.24 -> 0.43). Validation (held-out cases, 4096 locations, whole
volumes, no augmentation; log 4096 = 8.3 for chance): InfoNCE 2.91 / 2.61 /
2.52 / 2.49 / 2.53 and top-1 0.310 / 0.345 / 0.359 / 0.369 / 0.371 at steps
500 / 1000 / 1500 / 2000 / 2500 (flat after 1500). The shipped
``jaxreg/weights/dns_brain`` is step 2500. Registration results:
benchmarks/results/io_registration_dns.md and docs/design.md (DNS).

Ablations (DNS Table 5 and Sec. 3.3; 500 steps each, ``--config.num_train_steps=500``
with ``--config.model.dilations="(1,)"`` or ``--config.model.invert_prob=0.0``;
benchmarks/results/dns_ablation.md, ``benchmarks/dns_ablation.py``): without the
Bezier inversion io-dns is clearly worse (brats real / synthetic contrast EPE
1.64 / 1.29 vs 1.39 / 0.98 mm, IXI cross Dice 0.548 vs 0.583); the single
layout registers as well as the duo layout (1.35 / 0.95 mm, Dice 0.582).
"""
import os

import ml_collections

TRAIN_CASES = ("brats_space/brats_gli_00001", "ms_mni/patient07", "ms_mni/patient19",
               "brats2015/brats_2013_pat0003_1", "brats2015/brats_2013_pat0004_1",
               "brats2015/brats_2013_pat0005_1", "brats2015/brats_2013_pat0006_1", "ixi_t2/IXI002",
               "ixi/IXI033-HH-1259", "ixi/IXI034-HH-1260", "ixi/IXI039-HH-1261", "mni152")
VAL_CASES = ("brats_space/tcga_fg6692", "ixi/IXI012-HH-1211")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "dns"
    c.seed = 0
    c.num_train_steps = 2500
    c.batch_size = 1          # DNS Sec. 4.2
    c.num_devices = 0
    c.learning_rate = 1e-3    # paper 1e-4 (fixed); ours for the short CPU run
    c.schedule = "cosine"
    c.warmup_steps = 50
    c.grad_clip = 1.0
    c.log_every = 10
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    c.eval_every = 500
    c.quiet = False
    c.model = ml_collections.ConfigDict(dict(
        ndim=3, enc_features=(8, 16, 32, 32), dec_features=(32, 16, 8), dilations=(1, 2), squeeze_hidden=8,
        out_channels=24, use_dns=True, temperature=0.07, num_samples=8196, bezier_points=4, invert_prob=0.5,
        bezier_views=0.5, mask_threshold=0.05))
    c.data = ml_collections.ConfigDict(dict(
        kind="views", root=os.environ.get("JAXREG_DATA", "../shared/data"), resolution=2.0, crop=(48, 48, 48),
        same_prob=0.25, flip=True, train_cases=TRAIN_CASES, val_cases=VAL_CASES))
    return c
