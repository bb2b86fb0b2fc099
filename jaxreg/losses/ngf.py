"""Normalised gradient fields (NGF) similarity."""
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxreg.losses._utils import (
    Image,
    Mask,
    _check_pair,
    _mask_weights,
    _safe_div,
    _safe_sqrt,
    _weighted_mean,
)


def _gradient(image: Image) -> Float[Array, "*spatial C D"]:
    """Spatial gradient in voxel units: central differences inside, one-sided
    (forward/backward) first differences on the first/last slice of each axis
    (``jnp.gradient`` with ``edge_order=1``)."""
    d = image.ndim - 1
    return jnp.stack(jnp.gradient(image, axis=tuple(range(d))), axis=-1)


def ngf(
    fixed: Image,
    moving: Image,
    *,
    epsilon: float = 0.01,
    mask: Mask = None,
) -> Float[Array, ""]:
    """Normalised gradient fields distance: 1 - squared cosine of edge directions.

    With ``g_f = grad f`` and ``g_m = grad m`` (per channel, voxel units) and
    edge parameters ``e_f, e_m``::

        ngf(x) = 1 - (<g_f, g_m> + e_f e_m)^2 / ((|g_f|^2 + e_f^2)(|g_m|^2 + e_m^2))

    i.e. one minus the squared cosine between the augmented vectors
    ``(g_f, e_f)`` and ``(g_m, e_m)``; with ``e_f = e_m = eps`` it is the
    usual ``1 - (<g_f, g_m> + eps^2)^2 / ((|g_f|^2 + eps^2)(|g_m|^2 + eps^2))``.
    Because of the ``e_f e_m`` term, regions flat in both images count as
    matching (0) rather than as maximal mismatch (Haber & Modersitzki's
    normalised field has no such term). The loss is the mask-weighted mean of
    ``ngf(x)`` over voxels and channels.

    ``epsilon`` is *relative to the image scale*: ``e_f = epsilon * mean_x
    |grad f(x)|`` (mean over the mask; ``epsilon`` itself in intensity per
    voxel for a constant image), likewise ``e_m``. Gradient magnitudes far
    below ``e`` are treated as noise. This makes the loss invariant to
    ``a * image + b`` with ``a > 0`` (for ``a < 0`` only approximately: the
    ``e_f e_m`` term does not flip sign with the gradient).

    Gradients are central differences with one-sided differences at the
    border (as ``jnp.gradient``); each spatial axis needs >= 2 voxels. The
    mask weights the voxelwise terms; a masked-in voxel's gradient still reads
    its direct neighbours.

    Args:
      fixed: ``[*spatial, C]`` float image, 2 or 3 spatial axes.
      moving: ``[*spatial, C]`` float image, same shape as ``fixed``.
      epsilon: edge parameter relative to the mean gradient magnitude, > 0.
      mask: optional ``[*spatial]`` or ``[*spatial, 1]`` bool or float weights
        in [0, 1].

    Returns:
      Scalar loss to minimise in ``[0, 1]``: 0 where edges are parallel or
      antiparallel (and for ``fixed == moving``), 1 where they are orthogonal.
      0 for an empty mask.

    Raises:
      ValueError: if the images are not ``(*spatial, C)`` with 2 or 3 spatial
        axes, their shapes differ, a spatial axis has < 2 voxels, the mask
        shape does not match, or ``epsilon <= 0``.

    References:
      Haber & Modersitzki, "Intensity gradient based registration and fusion
      of multi-modal images", MICCAI 2006, LNCS 4191, Sec. 2 (normalised
      gradient field ``grad I / sqrt(|grad I|^2 + eta^2)`` and the distance
      ``1 - (n_R . n_T)^2``).
    """
    fixed, moving, spatial = _check_pair(fixed, moving)
    if min(spatial) < 2:
        raise ValueError(f"ngf needs >= 2 voxels along every spatial axis, got {spatial}")
    if isinstance(epsilon, (int, float)) and not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    w = _mask_weights(mask, spatial, fixed.dtype)
    axes = tuple(range(len(spatial)))

    def field(image):
        g = _gradient(image)
        sq = jnp.sum(g * g, axis=-1)  # (*spatial, C)
        scale = _safe_div(jnp.sum(w[..., None] * _safe_sqrt(sq), axes), jnp.sum(w))
        e = epsilon * jnp.where(scale > 0, scale, 1)  # (C,)
        return g, sq + e * e, e

    g_f, n_f, e_f = field(fixed)
    g_m, n_m, e_m = field(moving)
    dot = jnp.sum(g_f * g_m, axis=-1) + e_f * e_m
    return _weighted_mean(1 - _safe_div(dot * dot, n_f * n_m), w)
