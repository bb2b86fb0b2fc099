"""Jacobian determinant of phi = x + u and the regularity metrics built on it.

Derivatives are finite differences in voxel units, as ``np.gradient`` with
``edge_order=1``: central ``(f[i+1] - f[i-1]) / 2`` in the interior, one-sided
``f[1] - f[0]`` and ``f[-1] - f[-2]`` at the first and last voxel of each axis.
The public functions are jitted (one compile per shape and dtype; cheap to
call from host code) and compose with an outer ``jit``/``vmap``/``grad``.
The differences are exact for fields linear in x (affine maps give det J = det A
everywhere) and, in the interior, for quadratic fields.
"""
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from jaxreg.metrics._validate import _check_disp, _check_mask

# Clip of det J before the log in SDlogJ, as in the Learn2Reg evaluation code.
_LOG_CLIP = (1e-9, 1e9)


def _diff(f: Array, axis: int) -> Array:
    """np.gradient(f, axis=axis) with unit spacing and edge_order=1."""
    n = f.shape[axis]

    def take(start, stop):
        return lax.slice_in_dim(f, start, stop, axis=axis)

    first = take(1, 2) - take(0, 1)
    last = take(n - 1, n) - take(n - 2, n - 1)
    if n == 2:
        return jnp.concatenate([first, last], axis=axis)
    interior = (take(2, n) - take(0, n - 2)) * 0.5
    return jnp.concatenate([first, interior, last], axis=axis)


def _spatial_grad(f: Array, ndim: int) -> Array:
    """``(*spatial, ...)`` -> ``(*spatial, ..., ndim)``: derivative along each spatial axis."""
    return jnp.stack([_diff(f, axis) for axis in range(ndim)], axis=-1)


def _det(m: Array) -> Array:
    """Determinant of ``(..., D, D)`` for D = 2, 3 by the explicit cofactor formula."""
    if m.shape[-1] == 2:
        return m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]
    return (m[..., 0, 0] * (m[..., 1, 1] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 1])
            - m[..., 0, 1] * (m[..., 1, 0] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 0])
            + m[..., 0, 2] * (m[..., 1, 0] * m[..., 2, 1] - m[..., 1, 1] * m[..., 2, 0]))


@jax.jit
def jacobian_det(disp: Float[Array, "*spatial D"]) -> Float[Array, "*spatial"]:
    """Determinant of the Jacobian of ``phi(x) = x + u(x)`` at every voxel.

    ``J_ij = delta_ij + d u_i / d x_j`` with derivatives by finite differences
    in voxel units (central inside, one-sided on the border; see the module
    docstring). Jittable and differentiable.

    Args:
      disp: ``(*spatial, D)`` float displacement in voxel units of the fixed
        grid, D = 2 or 3, every spatial size >= 2.

    Returns:
      ``(*spatial)`` array of the disp dtype: local volume change of phi;
      1 for a translation, > 0 where phi preserves orientation, <= 0 where it
      folds.

    Raises:
      ValueError: if disp is not ``(*spatial, D)`` with D = len(spatial) in
        {2, 3}, not floating point, or has a spatial size < 2.

    References:
      Ashburner, "A fast diffeomorphic image registration algorithm",
      NeuroImage 38(1), 2007 (Jacobian determinants of phi).
      doi:10.1016/j.neuroimage.2007.07.007
    """
    spatial = _check_disp(disp, "jacobian_det")
    if min(spatial) < 2:
        raise ValueError(f"jacobian_det: every spatial size must be >= 2 for finite differences, "
                         f"got disp shape {tuple(disp.shape)}")
    ndim = len(spatial)
    grad_u = _spatial_grad(disp, ndim)  # (*spatial, D_i, D_j) = d u_i / d x_j
    return _det(grad_u + jnp.eye(ndim, dtype=disp.dtype))


def _masked_mean(x: Array, mask: Array | None) -> Array:
    if mask is None:
        return jnp.mean(x)
    w = (mask != 0).astype(x.dtype)
    return jnp.sum(w * x) / jnp.sum(w)  # empty mask -> NaN


def _safe_sqrt(x: Array) -> Array:
    """sqrt of x >= 0 with a finite gradient at 0 (double-where); NaN stays NaN."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), x)


@jax.jit
def folding_percent(disp: Float[Array, "*spatial D"], *,
                    mask: Bool[Array, "*spatial"] | None = None) -> Float[Array, ""]:
    """Percentage of voxels where phi folds: ``100 * mean(det J <= 0)``.

    Args:
      disp: ``(*spatial, D)`` displacement in voxels (see :func:`jacobian_det`).
      mask: optional ``(*spatial)`` bool/numeric array; nonzero voxels are
        counted, the rest ignored.

    Returns:
      Scalar in [0, 100] (float of the disp dtype); NaN for an empty mask.

    Raises:
      ValueError: on a bad disp shape (see :func:`jacobian_det`) or a mask
        whose shape is not the spatial shape.

    References:
      Dalca et al., "Unsupervised learning of probabilistic diffeomorphic
      registration for images and surfaces", MedIA 57, 2019 (count of voxels
      with non-positive Jacobian determinant).
    """
    det = jacobian_det(disp)
    mask = _check_mask(mask, det.shape, "folding_percent")
    return 100.0 * _masked_mean((det <= 0).astype(det.dtype), mask)


@jax.jit
def sdlogj(disp: Float[Array, "*spatial D"], *,
           mask: Bool[Array, "*spatial"] | None = None) -> Float[Array, ""]:
    """Standard deviation of ``log(det J)`` (SDlogJ), a smoothness measure.

    ``det J`` is clipped to ``[1e-9, 1e9]`` before the log, as in the Learn2Reg
    evaluation (``np.log(jac.clip(1e-9, 1e9))``), so folded voxels contribute
    ``log(1e-9) ~ -20.7`` instead of NaN. Population std (ddof = 0) over the
    voxels in ``mask``; gradient finite (zero) at the identity.

    Args:
      disp: ``(*spatial, D)`` displacement in voxels (see :func:`jacobian_det`).
      mask: optional ``(*spatial)`` bool/numeric array of the voxels to use.

    Returns:
      Scalar >= 0; 0 for any affine map with det A > 0; NaN for an empty mask.

    Raises:
      ValueError: on a bad disp or mask shape.

    References:
      Hering et al., "Learn2Reg: comprehensive multi-task medical image
      registration challenge", IEEE TMI 42(3), 2023 (SDlogJ).
      doi:10.1109/TMI.2022.3213983
    """
    det = jacobian_det(disp)
    mask = _check_mask(mask, det.shape, "sdlogj")
    logj = jnp.log(jnp.clip(det, *_LOG_CLIP))
    mean = _masked_mean(logj, mask)
    return _safe_sqrt(_masked_mean((logj - mean) ** 2, mask))


@jax.jit
def jacobian_grad_magnitude(disp: Float[Array, "*spatial D"], *,
                            mask: Bool[Array, "*spatial"] | None = None) -> Float[Array, ""]:
    """Mean magnitude of the spatial gradient of ``det J``, ``mean |grad det J|``.

    The gradient of the determinant field uses the same finite differences
    (voxel units, so the value is per voxel); large values flag abrupt local
    volume changes that SDlogJ averages away.

    Args:
      disp: ``(*spatial, D)`` displacement in voxels (see :func:`jacobian_det`).
      mask: optional ``(*spatial)`` bool/numeric array of the voxels to use.

    Returns:
      Scalar >= 0 in 1/voxel; 0 for affine maps; NaN for an empty mask.

    Raises:
      ValueError: on a bad disp or mask shape.

    References:
      Dey et al., "ContraReg: Contrastive Learning of Multi-modality
      Unsupervised Deformable Image Registration", MICCAI 2022 (reported
      alongside % folding).
    """
    det = jacobian_det(disp)
    mask = _check_mask(mask, det.shape, "jacobian_grad_magnitude")
    g = _spatial_grad(det, det.ndim)
    return _masked_mean(_safe_sqrt(jnp.sum(g * g, axis=-1)), mask)
