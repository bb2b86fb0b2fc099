"""Pretraining of DeepSim's feature extractor as an auto-encoder on 2D slices of all four contrasts at 2 mm.

Paper: Czolbe et al., "DeepSim", MIDL 2021, Sec. 3 ("Feature extraction":
auto-encoder, DeepSim-AE) and Sec. 4 (three stages of batch norm + 2 convs +
dropout, LeakyReLU, sigmoid output, MSE). Method
``jaxreg/methods/features.py`` (``kind="deepsim_ae"``). Command::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python -m train.main \\
        --config configs/deepsim_features_brain2d.py --workdir runs/deepsim_features_brain2d

CPU scale: widths 32-64-128 (the paper's 3D widths; its 2D widths 64-128-256
are the default of ``model.features=()``, 4x the FLOPs). Data as
``configs/contrareg_features_brain2d.py``; every contrast is its own training
image (batch 2 slices = 8 images; 0.5 steps/s at batch 4, so 600 steps of batch 2).
"""
import ml_collections

from configs import contrareg_features_brain2d as base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.model.kind = "deepsim_ae"
    c.model.features = (32, 64, 128)
    c.batch_size = 2
    c.num_train_steps = 600
    c.eval_every = 300
    return c
