"""Pretraining of DeepSim's feature extractors on whole IXI T1 volumes at 4 mm (for ``configs/deepsim_ixi3d.py``).

Paper: Czolbe et al., "DeepSim", MIDL 2021, Sec. 3 ("Feature extraction") and
Sec. 4 (3D widths 32-64-128). Commands::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python -m train.main \\
        --config configs/deepsim_features_ixi3d.py --workdir runs/deepsim_features_ixi3d_seg
    ... --config.model.kind=deepsim_ae --workdir runs/deepsim_features_ixi3d_ae

Same cases and heads as ``configs/deepsim_features_ixi2d.py`` (IXI 014, 015,
033, 034, 039; validation IXI012), as whole 48x64x48 volumes at 4 mm
(``configs/contrareg_features_brain3d.to_3d``), batch 2.

Cost on the 2 CPU cores (2026-12-03, 12-step probes): 6.5 s per step with the
segmentation head (149 classes), 5.8 s with the auto-encoder head, so 600 steps
take about an hour per extractor.

Measured (2026-12-03, session 19; shorter than the default for lack of CPU
time, with ``--config.num_train_steps=300 --config.eval_every=150`` for the
segmentation head and ``=150`` steps for the auto-encoder): segmentation
cross-entropy 0.79 -> 0.47 over 300 steps (61 min beside other jobs), held-out
IXI012 Dice over the 148 labels 0.006 / 0.020 at steps 150 / 300 (it has not
learned to segment yet). Auto-encoder (session 21, after the fix of its head:
an auto-encoder head always has one output), ``--config.num_train_steps=150
--config.eval_every=150``: 40 min beside another run, validation MSE 0.0037.
Registration results with these extractors: configs/deepsim_ixi3d.py.
"""
import ml_collections

from configs import contrareg_features_brain3d as f3
from configs import deepsim_features_ixi2d as fi


def get_config() -> ml_collections.ConfigDict:
    c = f3.to_3d(fi.get_config())
    c.batch_size = 2
    c.num_train_steps = 600
    c.eval_every = 300
    return c
