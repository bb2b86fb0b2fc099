"""Local (windowed) normalised cross-correlation."""
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxreg.losses._utils import (
    Image,
    Mask,
    _box_sum,
    _check_int,
    _check_pair,
    _mask_weights,
    _safe_div,
    _weighted_mean,
)


def lncc(
    fixed: Image,
    moving: Image,
    *,
    window: int = 9,
    mask: Mask = None,
    eps: float = 1e-5,
) -> Float[Array, ""]:
    """Negative local normalised cross-correlation (squared, VoxelMorph style).

    For every voxel ``x`` and channel, with window sums ``S`` over the
    ``window^D`` cube centred on ``x`` (weighted by the mask ``w``)::

        cross = S[w f m] - S[w f] S[w m] / S[w]
        var_f = S[w f^2] - S[w f]^2 / S[w]        (likewise var_m)
        cc(x) = cross^2 / (var_f var_m + eps)

    and the loss is ``-sum_x w(x) mean_c cc(x) / sum_x w(x)``.

    Windows are zero padded at the image border ('SAME'), but the padding and
    masked-out voxels are *absent*, not zero-valued data: the statistics are
    normalised by ``S[w]``, the weight actually inside the window. So the loss
    is exactly invariant to ``a * image + b`` (``a != 0``) of either image,
    also at the border, up to ``eps`` and rounding; and voxels with mask 0 do
    not influence the value at all. (VoxelMorph divides by ``window^D``
    instead, which treats the padding as intensity 0; the two agree away from
    the border when ``mask`` is None.) Windows with zero variance (flat
    regions, constant images) give ``cc = 0`` with finite gradients.
    Multi-channel images are compared channel by channel and averaged.

    Args:
      fixed: ``[*spatial, C]`` float image, 2 or 3 spatial axes.
      moving: ``[*spatial, C]`` float image, same shape as ``fixed``.
      window: side length of the cubic window in voxels; a positive odd Python
        int, static under ``jit``. VoxelMorph's default is 9.
      mask: optional ``[*spatial]`` or ``[*spatial, 1]`` bool or float weights
        in [0, 1]; masked-out voxels neither enter the window statistics nor
        the average.
      eps: stabiliser added to ``var_f var_m`` (units of intensity^4 times
        voxel count^2, as in VoxelMorph: the window statistics are sums).

    Returns:
      Scalar loss to minimise in ``[-1, 0]``: -1 for images that agree up to a
      local affine intensity map, 0 for locally uncorrelated ones (and for an
      empty mask).

    Raises:
      ValueError: if the images are not ``(*spatial, C)`` with 2 or 3 spatial
        axes, their shapes differ, the mask shape does not match, or
        ``window`` is not a positive odd int.

    References:
      Avants et al., "Symmetric diffeomorphic image registration with
      cross-correlation", MedIA 12(1) 2008 (cross-correlation in a local
      window); Balakrishnan et al., "VoxelMorph: a learning framework for
      deformable medical image registration", IEEE TMI 2019, Sec. III-C
      (the squared local correlation used here, window 9).

    Example:
      >>> import jax
      >>> f = jax.random.normal(jax.random.key(0), (16, 16, 1))
      >>> round(float(lncc(f, 3.0 * f + 1.0, window=5)), 4)
      -1.0
    """
    fixed, moving, spatial = _check_pair(fixed, moving)
    window = _check_int(window, "window", minimum=1, odd=True)
    w = _mask_weights(mask, spatial, fixed.dtype)
    wc = w[..., None]
    axes = tuple(range(len(spatial)))

    # LNCC ignores intensity offsets; removing the global (masked) mean first
    # keeps S[f^2] - S[f]^2 / S[w] free of float32 cancellation.
    def centre(image):
        mean = _safe_div(jnp.sum(wc * image, axes), jnp.sum(wc, axes))
        return image - jax.lax.stop_gradient(mean)

    f, m = centre(fixed), centre(moving)
    wf, wm = wc * f, wc * m
    # One reduce_window over all statistics, stacked on the channel axis.
    sums = _box_sum(jnp.concatenate([wc, wf, wm, wf * f, wm * m, wf * m], -1), window)
    n = sums[..., :1]
    s_f, s_m, s_ff, s_mm, s_fm = jnp.split(sums[..., 1:], 5, axis=-1)
    cross = s_fm - _safe_div(s_f * s_m, n)
    var_f = jnp.maximum(s_ff - _safe_div(s_f * s_f, n), 0)
    var_m = jnp.maximum(s_mm - _safe_div(s_m * s_m, n), 0)
    cc = cross * cross / (var_f * var_m + eps)
    return -_weighted_mean(cc, w)
