"""Identity grids and voxel <-> world (NIfTI RAS) coordinate maps.

World space exists only here and in :mod:`jaxreg.io` (see docs/design.md).
"""
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


def identity_grid(shape: Sequence[int], dtype=jnp.float32) -> Float[Array, "*spatial D"]:
    """Voxel coordinates of every voxel of a grid.

    Args:
      shape: spatial shape ``(*spatial)``, length D = 2 or 3.
      dtype: floating dtype of the result.

    Returns:
      ``(*spatial, D)`` array whose entry at index ``x`` is ``x`` (voxel units).

    Raises:
      ValueError: if ``len(shape)`` is not 2 or 3 or a size is not positive.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"identity_grid: expected a 2D or 3D positive shape, got {shape}")
    axes = [jnp.arange(s, dtype=dtype) for s in shape]
    return jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)


def _check_affine(affine, d: int):
    affine = np.asarray(affine, dtype=np.float64) if not hasattr(affine, "aval") else affine
    if affine.shape != (d + 1, d + 1):
        raise ValueError(f"affine must be ({d + 1}, {d + 1}) for {d}D points, got {affine.shape}")
    return affine


def voxel_to_world(points: Float[Array, "... D"], affine: Float[Array, "D+1 D+1"]) -> Float[Array, "... D"]:
    """Map voxel coordinates to world coordinates (mm) with a homogeneous affine.

    Args:
      points: ``(..., D)`` voxel coordinates (index order of the array axes).
      affine: ``(D+1, D+1)`` voxel-to-world matrix (the NIfTI ``sform``/``qform``
        for D = 3, RAS+ mm).

    Returns:
      ``(..., D)`` world coordinates in mm.

    Raises:
      ValueError: if the affine does not match the point dimension.
    """
    d = points.shape[-1]
    affine = _check_affine(affine, d)
    a = jnp.asarray(affine, dtype=points.dtype)
    return points @ a[:d, :d].T + a[:d, d]


def world_to_voxel(points: Float[Array, "... D"], affine: Float[Array, "D+1 D+1"]) -> Float[Array, "... D"]:
    """Inverse of :func:`voxel_to_world`: world (mm) to voxel coordinates.

    Args:
      points: ``(..., D)`` world coordinates in mm.
      affine: ``(D+1, D+1)`` voxel-to-world matrix of the target image.

    Returns:
      ``(..., D)`` voxel coordinates (may be fractional or outside the grid).

    Raises:
      ValueError: if the affine does not match the point dimension.
    """
    d = points.shape[-1]
    affine = _check_affine(affine, d)
    inv = jnp.asarray(np.linalg.inv(np.asarray(affine, np.float64)) if not hasattr(affine, "aval")
                      else jnp.linalg.inv(affine), dtype=points.dtype)
    return points @ inv[:d, :d].T + inv[:d, d]


def voxel_spacing(affine: Float[Array, "D+1 D+1"]) -> np.ndarray:
    """Voxel size in mm along each array axis: the column norms of the affine.

    Args:
      affine: ``(D+1, D+1)`` voxel-to-world matrix.

    Returns:
      ``(D,)`` float64 numpy array of positive spacings (mm).
    """
    affine = np.asarray(affine, dtype=np.float64)
    d = affine.shape[0] - 1
    return np.linalg.norm(affine[:d, :d], axis=0)
