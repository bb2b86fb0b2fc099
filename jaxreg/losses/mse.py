"""Mean squared error between two images."""
from jaxtyping import Array, Float

from jaxreg.losses._utils import Image, Mask, _check_pair, _mask_weights, _weighted_mean


def mse(fixed: Image, moving: Image, *, mask: Mask = None) -> Float[Array, ""]:
    """Mean squared intensity difference, the mono-modal baseline.

    Computes ``sum_x w(x) mean_c (f(x, c) - m(x, c))^2 / sum_x w(x)`` where
    ``w`` is the mask (all ones when ``mask`` is None).

    Args:
      fixed: ``[*spatial, C]`` float image, 2 or 3 spatial axes.
      moving: ``[*spatial, C]`` float image, same shape as ``fixed``.
      mask: optional ``[*spatial]`` or ``[*spatial, 1]`` bool or float weights
        in [0, 1]; voxels with weight 0 do not contribute.

    Returns:
      Scalar loss to minimise, in ``[0, inf)`` (intensity units squared);
      0 iff the images agree on the mask. 0 if the mask is empty.

    Raises:
      ValueError: if the images are not ``(*spatial, C)`` with 2 or 3 spatial
        axes, their shapes differ, or the mask shape does not match.

    References:
      Standard sum-of-squared-differences similarity; e.g. Balakrishnan et al.,
      "VoxelMorph: a learning framework for deformable medical image
      registration", IEEE TMI 2019, Sec. III-C (MSE similarity).

    Example:
      >>> import jax.numpy as jnp
      >>> float(mse(jnp.zeros((4, 4, 1)), jnp.ones((4, 4, 1))))
      1.0
    """
    fixed, moving, spatial = _check_pair(fixed, moving)
    w = _mask_weights(mask, spatial, fixed.dtype)
    return _weighted_mean((fixed - moving) ** 2, w)
