"""Pretraining of ContraReg's modality-specific autoencoders (T1, T2, FLAIR, T1c) on 2D axial slices at 2 mm.

Paper: Dey et al., "ContraReg", MICCAI 2022, Sec. 3 "Unsupervised
pre-training" (one autoencoder per modality, L1 + local NCC window 7, random
flips + brightness/contrast) and Sec. 4 (7 Conv-IN-LeakyReLU blocks,
32-64-128-64-32-32-32-1). Method ``jaxreg/methods/features.py``
(``kind="contrareg_ae"``). Command (from the repository root)::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python -m train.main \\
        --config configs/contrareg_features_brain2d.py --workdir runs/contrareg_features_brain2d

Data: :func:`crossreg_cases` (the same training cases as the registration
networks of ``configs/contrareg_brain2d.py``; the held-out cases are never
seen): random axial slices of the co-registered contrasts, flipped. The paper
trains on 128^3 crops of 405 neonatal volumes; here 96x112 slices of 3 adult
brains.
"""
import os

import ml_collections

# held out: ms_mni patient19 has lesion labels (the table's Dice column); brats_gli_00001 has no tumour labels here
TRAIN_CASES = ("brats_space/tcga_fg6692", "brats_space/brats_gli_00001", "ms_mni/patient07")
VAL_CASES = ("ms_mni/patient19", "ixi_t2/IXI002")
CONTRASTS = ("t1", "t2", "flair", "t1c")


def base(method: str) -> ml_collections.ConfigDict:
    """Training settings shared by the ContraReg / DeepSim configs (CPU scale)."""
    c = ml_collections.ConfigDict()
    c.method = method
    c.seed = 0
    c.num_train_steps = 1000
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
    return c


def get_config() -> ml_collections.ConfigDict:
    c = base("features")
    c.batch_size = 4
    c.num_train_steps = 1500
    c.model = ml_collections.ConfigDict(dict(ndim=2, kind="contrareg_ae", contrasts=CONTRASTS, features=(),
                                             num_classes=0, dropout=0.2, lncc_window=7, brightness=0.1,
                                             contrast_range=(0.8, 1.2)))
    c.data = ml_collections.ConfigDict(dict(
        kind="slices", root=os.environ.get("JAXREG_DATA", "../shared/data"), resolution=2.0, crop=(96, 112, 80),
        train_cases=TRAIN_CASES, val_cases=VAL_CASES[:1], slice_axis=2, flip=True, num_val=4))
    return c
