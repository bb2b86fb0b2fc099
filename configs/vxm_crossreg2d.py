"""VXM baselines of the cross-contrast comparison: the ContraReg network trained with a hand-made similarity.

Same network, data, lambda conditioning, steps and batch as
``configs/contrareg_brain2d.py``; ``L_reg`` on the velocity as ContraReg's.
Loss ``(1 - lambda) L_sim + lambda reg_scale L_reg`` (HyperMorph / ContraReg
Sec. 3). Commands (one per row of ContraReg's Table 1 A)::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python -m train.main \\
        --config configs/vxm_crossreg2d.py --workdir runs/vxm_mi_2d --config.model.similarity=mi
    ... --config.model.similarity=local_mi --workdir runs/vxm_lmi_2d
    ... --config.model.similarity=mind --workdir runs/vxm_mind_2d
    ... --config.model.similarity=ngf --workdir runs/vxm_ngf_2d

Similarity settings: MI 32 bins (the paper: 48), local MI 32 bins over
9-voxel patches, MIND-SSC radius 1 dilation 1 (the paper: distance 2, patch
3), NGF; as ``jaxreg.losses``.

Wall time (2026-12-03, 2 cores, beside another run): 2000 steps in 8-11 min per
row. Results in ``configs/contrareg_brain2d.py`` and ``benchmarks/results/crossreg_table.md``.
"""
import ml_collections

from configs import contrareg_brain2d as cr
from configs import contrareg_features_brain2d as fb


def get_config() -> ml_collections.ConfigDict:
    c = fb.base("voxelmorph")
    c.update(cr.STEPS)
    c.model = ml_collections.ConfigDict(dict(
        cr.NETWORK, input_features="image", norm=False, velocity_sigma=0.0, bidirectional=False, similarity="mi",
        loss_sigma=0.0, loss_scales=1, loss_mask_threshold=0.0, lncc_window=9, mi_bins=32, local_mi_patch=9,
        reg_field="velocity", reg_weight=1.0, lambda_distribution="uniform", reg_scale=1.0,
        supervised=False))
    c.data = cr.crossreg_data()
    return c
