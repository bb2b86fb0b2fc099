"""Thin-plate splines (2D/3D): kernel, differentiable regularised solve, chunked dense evaluation.

Points are ``(N, D)`` in **voxel coordinates** (axis order = array axis
order). For conditioning, :func:`tps_solve` centres the control points and
divides by their RMS distance from the centre, ``p' = (p - mu) / s``; the
kernel, the regulariser ``lambda`` and the evaluation all live in these
normalised coordinates (so ``lambda`` does not depend on the image size in
voxels), and the returned :class:`TPS` carries ``mu`` and ``s`` to map
evaluation points the same way. Targets stay in voxels.

References:
  Bookstein, "Principal warps: thin-plate splines and the decomposition of
  deformations", IEEE TPAMI 1989; Wang, Yu, Dalca, Sabuncu, "A robust and
  interpretable deep learning framework for multi-modal registration via
  keypoints" (KeyMorph), MedIA 2023, Sec. 3.2 eqs. (4)-(9): ``U(r) = r^2 ln r``,
  ``[[K + lambda I, L], [L^T, 0]] [W; A] = [Q; 0]``.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxreg.spatial.grid import identity_grid


class TPS(NamedTuple):
    """A fitted thin-plate spline ``T(p) = A^T [1; p'] + sum_i W_i U(|p' - c_i|)``, ``p' = (p - mu) / scale``.

    Attributes:
      control: ``(N, D)`` control points in normalised coordinates.
      weights: ``(N, D)`` kernel weights ``W``.
      affine: ``(D+1, D)`` affine part ``A`` (rows: constant, then the axes).
      mu: ``(D,)`` centre of the control points (voxels).
      scale: scalar RMS radius of the control points (voxels).
    """

    control: Array
    weights: Array
    affine: Array
    mu: Array
    scale: Array


def tps_kernel(r2: Float[Array, "..."]) -> Float[Array, "..."]:
    """``U(r) = r^2 ln r`` as a function of the squared distance ``r2`` (``U(0) = 0``, NaN-free gradients).

    ``r^2 ln r = r2 ln(r2) / 2``; the double ``where`` keeps the gradient at
    ``r2 = 0`` finite (it is 0, the limit).
    """
    ok = r2 > 0
    safe = jnp.where(ok, r2, 1.0)
    return jnp.where(ok, 0.5 * r2 * jnp.log(safe), 0.0)


def _sq_dist(a, b):
    return jnp.sum(jnp.square(a[:, None, :] - b[None, :, :]), axis=-1)


def tps_solve(
    control: Float[Array, "N D"],
    target: Float[Array, "N D"],
    *,
    lam: float | Float[Array, ""] = 0.0,
) -> TPS:
    """Fit the TPS mapping ``control`` points onto ``target`` points (KeyMorph eqs. 7-9).

    Solves ``[[K + lam I, L], [L^T, 0]] [W; A] = [Q; 0]`` with
    ``K_ij = U(|c_i - c_j|)``, ``L = [1, c]`` in normalised coordinates (see
    the module docstring). ``lam = 0`` interpolates the targets exactly;
    ``lam -> inf`` tends to the least-squares affine fit
    (:func:`jaxreg.spatial.fit_affine`). Differentiable in ``control``,
    ``target`` and ``lam`` (one dense linear solve, float32).

    Args:
      control: ``(N, D)`` control points (voxels), D = 2 or 3, ``N >= D + 1``,
        not all on a hyperplane.
      target: ``(N, D)`` their images (voxels), e.g. fixed keypoints ->
        moving keypoints for a pull-back map.
      lam: regulariser ``lambda >= 0`` (scalar, may be traced).

    Returns:
      :class:`TPS`.

    Raises:
      ValueError: on mismatched or wrong shapes, or too few points.
    """
    if control.ndim != 2 or control.shape != target.shape or control.shape[1] not in (2, 3):
        raise ValueError(f"tps_solve: control and target must both be (N, D), D in (2, 3); got "
                         f"{control.shape} and {target.shape}")
    n, d = control.shape
    if n < d + 1:
        raise ValueError(f"tps_solve: need at least {d + 1} points in {d}D, got {n}")
    control = jnp.asarray(control, jnp.float32)
    target = jnp.asarray(target, jnp.float32)
    mu = jnp.mean(control, axis=0)
    scale = jnp.sqrt(jnp.mean(jnp.sum(jnp.square(control - mu), axis=-1))) + 1e-6
    c = (control - mu) / scale
    k = tps_kernel(_sq_dist(c, c)) + jnp.asarray(lam, jnp.float32) * jnp.eye(n)
    l_mat = jnp.concatenate([jnp.ones((n, 1)), c], axis=1)
    top = jnp.concatenate([k, l_mat], axis=1)
    bottom = jnp.concatenate([l_mat.T, jnp.zeros((d + 1, d + 1))], axis=1)
    rhs = jnp.concatenate([target, jnp.zeros((d + 1, d))], axis=0)
    sol = jnp.linalg.solve(jnp.concatenate([top, bottom], axis=0), rhs)
    return TPS(c, sol[:n], sol[n:], mu, scale)


def tps_transform(tps: TPS, points: Float[Array, "M D"], *, chunk: int = 0) -> Float[Array, "M D"]:
    """``T(points)``, ``(M, D)`` voxels -> ``(M, D)`` voxels; in chunks of ``chunk`` points (``lax.map``) if > 0.

    Memory is ``O(chunk * N)`` instead of ``O(M * N)``; the result is the
    same (tested).
    """
    d = tps.control.shape[1]
    if points.ndim != 2 or points.shape[1] != d:
        raise ValueError(f"tps_transform: points must be (M, {d}), got {points.shape}")

    def apply(p):
        q = (p - tps.mu) / tps.scale
        u = tps_kernel(_sq_dist(q, tps.control))
        return tps.affine[0] + q @ tps.affine[1:] + u @ tps.weights

    m = points.shape[0]
    if chunk <= 0 or chunk >= m:
        return apply(points)
    pad = (-m) % chunk
    padded = jnp.concatenate([points, jnp.zeros((pad, d), points.dtype)], axis=0)
    out = jax.lax.map(apply, padded.reshape(-1, chunk, d))
    return out.reshape(-1, d)[:m]


def tps_disp(tps: TPS, shape, *, chunk: int = 65536) -> Float[Array, "*spatial D"]:
    """Dense displacement ``T(x) - x`` on the voxel grid ``shape`` (the project's ``disp`` convention).

    With ``tps = tps_solve(fixed_keypoints, moving_keypoints)``,
    ``warp(moving, tps_disp(tps, fixed_shape))`` is the moving image pulled
    back onto the fixed grid (KeyMorph Sec. 3.2). Evaluated in chunks of
    ``chunk`` voxels (0 = all at once): at 1 mm (160x192x160, N = 128) one
    chunk of 65536 voxels holds an ``8.4M``-entry kernel matrix instead of
    ``630M``.

    Returns:
      ``(*shape, D)`` float32 displacement in voxels.
    """
    shape = tuple(int(s) for s in shape)
    grid = identity_grid(shape).reshape(-1, len(shape))
    return (tps_transform(tps, grid, chunk=chunk) - grid).reshape(*shape, len(shape))
