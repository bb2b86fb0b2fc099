"""Registration quality metrics: overlap, surface distance, regularity, accuracy.

Host (numpy) functions: :func:`dice`, :func:`hd95` (with :func:`label_surfaces` to reuse one map's surfaces),
:func:`endpoint_error_stats`.
Jittable (JAX) functions: :func:`dice_jax`, :func:`jacobian_det`,
:func:`folding_percent`, :func:`sdlogj`, :func:`jacobian_grad_magnitude`,
:func:`endpoint_error`, :func:`tre`; :func:`dice_mean` and :func:`dice30` take
either kind. Per-label scores are NaN for labels that cannot be scored
(absent from both maps for Dice, from either map for HD95); the reducers
ignore NaN.
"""
from jaxreg.metrics.dice import dice, dice30, dice_jax, dice_mean
from jaxreg.metrics.distance import LabelSurfaces, hd95, label_surfaces
from jaxreg.metrics.error import endpoint_error, endpoint_error_stats, tre
from jaxreg.metrics.jacobian import folding_percent, jacobian_det, jacobian_grad_magnitude, sdlogj

__all__ = [
    "dice",
    "dice30",
    "dice_jax",
    "dice_mean",
    "endpoint_error",
    "endpoint_error_stats",
    "folding_percent",
    "hd95",
    "label_surfaces",
    "LabelSurfaces",
    "jacobian_det",
    "jacobian_grad_magnitude",
    "sdlogj",
    "tre",
]
