"""Displacement accuracy in mm: dense endpoint error and landmark TRE."""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import ndimage as jndimage
from jaxtyping import Array, Bool, Float

from jaxreg.metrics._validate import _check_disp, _check_mask, _check_spacing


def _norm_mm(diff: Array, spacing) -> Array:
    """Euclidean norm over the last axis after scaling voxel offsets to mm."""
    d = diff * jnp.asarray(spacing, diff.dtype)
    sq = jnp.sum(d * d, axis=-1)
    pos = sq > 0
    # double-where: finite gradient at 0; `sq` (not 0) in the else branch keeps NaN inputs NaN
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), sq)


def endpoint_error(disp_est: Float[Array, "*spatial D"], disp_true: Float[Array, "*spatial D"], *,
                   spacing: Sequence[float],
                   mask: Bool[Array, "*spatial"] | None = None) -> Float[Array, "*spatial"]:
    """Per-voxel endpoint error ``|(u_est(x) - u_true(x)) * spacing|`` in mm.

    The distance between where the estimated and the true map send each fixed
    voxel, ``phi_est(x) - phi_true(x) = u_est(x) - u_true(x)``, with voxel
    offsets scaled per axis to mm (the grid axes are assumed orthogonal).
    Jittable; gradient finite at zero error.

    Args:
      disp_est: ``(*spatial, D)`` estimated displacement, voxel units of the
        fixed grid, D = 2 or 3.
      disp_true: ``(*spatial, D)`` ground-truth displacement, same layout.
      spacing: voxel size in mm along each array axis, D positive floats
        (may be a traced ``(D,)`` array).
      mask: optional ``(*spatial)`` bool/numeric array; voxels where it is 0
        are set to NaN so that unmasked reductions cannot silently include them.

    Returns:
      ``(*spatial)`` float array (disp dtype), >= 0, in mm; NaN outside mask.

    Raises:
      ValueError: if the displacements are not ``(*spatial, D)`` or differ in
        shape, spacing is not D positive finite values, or the mask shape is
        not the spatial shape.

    References:
      Baker et al., "A Database and Evaluation Methodology for Optical Flow",
      IJCV 92(1), 2011 (endpoint error).
    """
    spatial = _check_disp(disp_est, "endpoint_error", "disp_est")
    if tuple(disp_true.shape) != tuple(disp_est.shape):
        raise ValueError(f"endpoint_error: disp_est and disp_true shapes differ: "
                         f"{tuple(disp_est.shape)} vs {tuple(disp_true.shape)}")
    _check_disp(disp_true, "endpoint_error", "disp_true")
    spacing = _check_spacing(spacing, len(spatial), "endpoint_error")
    mask = _check_mask(mask, spatial, "endpoint_error")
    return _endpoint_error(jnp.asarray(disp_est), jnp.asarray(disp_true), jnp.asarray(spacing, disp_est.dtype),
                           None if mask is None else jnp.asarray(mask))


@jax.jit
def _endpoint_error(disp_est, disp_true, spacing, mask):
    err = _norm_mm(disp_est - disp_true, spacing)
    if mask is None:
        return err
    return jnp.where(mask != 0, err, jnp.nan)


def endpoint_error_stats(disp_est: Float[Array, "*spatial D"], disp_true: Float[Array, "*spatial D"], *,
                         spacing: Sequence[float],
                         mask: Bool[Array, "*spatial"] | None = None) -> dict[str, float]:
    """Summary of :func:`endpoint_error` over the voxels in ``mask`` (host, numpy).

    Args:
      disp_est: ``(*spatial, D)`` estimated displacement in voxels.
      disp_true: ``(*spatial, D)`` true displacement in voxels.
      spacing: voxel size in mm along each array axis, D positive floats.
      mask: optional ``(*spatial)`` bool/numeric array of the voxels to score
        (e.g. the brain); default all voxels.

    Returns:
      ``{"mean", "median", "p95", "max"}`` as Python floats in mm (``p95`` by
      numpy's linear-interpolation percentile).

    Raises:
      ValueError: as :func:`endpoint_error`; also if the mask selects no voxel
        or the displacements hold NaN/Inf in the scored voxels.
    """
    err = np.asarray(endpoint_error(disp_est, disp_true, spacing=spacing, mask=mask))
    if mask is not None:
        err = err[np.asarray(mask) != 0]
    else:
        err = err.ravel()
    if err.size == 0:
        raise ValueError(f"endpoint_error_stats: the mask selects no voxel (mask shape {np.shape(mask)})")
    if not np.all(np.isfinite(err)):
        raise ValueError("endpoint_error_stats: disp_est or disp_true holds NaN/Inf inside the mask")
    return {"mean": float(err.mean()), "median": float(np.median(err)),
            "p95": float(np.percentile(err, 95)), "max": float(err.max())}


def tre(points_fixed: Float[Array, "N D"], points_moving: Float[Array, "N D"],
        disp: Float[Array, "*spatial D"], *, spacing: Sequence[float]) -> Float[Array, " N"]:
    """Target registration error of each landmark pair, in mm.

    ``TRE_n = |(p_f + u(p_f) - p_m) * spacing|``: the fixed landmark is mapped
    by ``phi = x + u`` (pull-back convention: phi takes fixed-grid points to
    their match in the moving image) and compared with the moving landmark.
    ``u(p_f)`` is sampled by linear interpolation
    (``jax.scipy.ndimage.map_coordinates``, ``order=1``, ``mode='nearest'``:
    points outside the grid take the border value). Jittable.

    Args:
      points_fixed: ``(N, D)`` landmarks in voxel coordinates of the fixed grid.
      points_moving: ``(N, D)`` corresponding landmarks, also in voxel
        coordinates of the fixed grid (map moving-image landmarks through the
        affines first, e.g. with :mod:`jaxreg.spatial.grid`).
      disp: ``(*spatial, D)`` displacement in voxel units of the fixed grid.
      spacing: fixed-grid voxel size in mm per array axis, D positive floats.

    Returns:
      ``(N,)`` float array, >= 0, in mm (average it for the usual mean TRE).

    Raises:
      ValueError: if the point sets are not ``(N, D)`` of equal shape, D does
        not match disp, or spacing is not D positive finite values.

    References:
      Fitzpatrick, West, Maurer, "Predicting error in rigid-body point-based
      registration", IEEE TMI 17(5), 1998. doi:10.1109/42.736021
    """
    spatial = _check_disp(disp, "tre")
    ndim = len(spatial)
    pf_shape, pm_shape = tuple(jnp.shape(points_fixed)), tuple(jnp.shape(points_moving))
    if pf_shape != pm_shape or len(pf_shape) != 2 or pf_shape[1] != ndim:
        raise ValueError(f"tre: points_fixed and points_moving must both be (N, {ndim}) for disp shape "
                         f"{tuple(disp.shape)}, got {pf_shape} and {pm_shape}")
    spacing = _check_spacing(spacing, ndim, "tre")
    disp = jnp.asarray(disp)
    return _tre(jnp.asarray(points_fixed, disp.dtype), jnp.asarray(points_moving, disp.dtype), disp,
                jnp.asarray(spacing, disp.dtype))


@jax.jit
def _tre(pf, pm, disp, spacing):
    ndim = disp.shape[-1]
    u = jnp.stack([jndimage.map_coordinates(disp[..., i], list(pf.T), order=1, mode="nearest")
                   for i in range(ndim)], axis=-1)
    return _norm_mm(pf + u - pm, spacing)
