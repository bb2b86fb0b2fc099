"""Affine transforms in voxel space: parameters <-> matrix, least-squares fit, dense field.

A matrix ``A`` is ``(D+1, D+1)`` homogeneous and maps fixed voxel coordinates
to moving voxel coordinates (pull-back, like a displacement field):
``phi(x) = A[:D, :D] x + A[:D, D]``.

Parameters (flat vector, layout given by :func:`num_params`):
``[translation (D), rotation (1 in 2D / 3 in 3D, radians), scale (D), shear (1 / 3)]``
and ``A = T(c + t) R S Sh T(-c)`` about a centre ``c`` (voxels) where
``R = R_2(g) R_1(b) R_0(a)`` rotates about array axes 2, 1, 0 (in 3D; in 2D a
single angle in the plane of axes 0 -> 1), ``S = diag(scale)`` and ``Sh`` is
unit upper-triangular with the shears (entries (0,1), (0,2), (1,2)).
"""
import functools

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxreg.spatial.grid import identity_grid


def num_params(ndim: int) -> dict:
    """Sizes of the parameter groups for a ``ndim``-D affine (2 or 3)."""
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    r = 1 if ndim == 2 else 3
    return {"translation": ndim, "rotation": r, "scale": ndim, "shear": r}


def identity_params(ndim: int) -> Float[Array, "P"]:
    """Parameter vector of the identity transform (scales 1, the rest 0)."""
    n = num_params(ndim)
    return jnp.concatenate([jnp.zeros(n["translation"] + n["rotation"]), jnp.ones(n["scale"]), jnp.zeros(n["shear"])])


def _rotation(angles, ndim):
    """``R`` as a ``D x D`` nested list of scalars: explicit entries, which XLA fuses into one loop (products of
    small matrices compiled to a dozen tiny kernels in the affine stage's program; issue 18)."""
    if ndim == 2:
        c, s = jnp.cos(angles[0]), jnp.sin(angles[0])
        return [[c, -s], [s, c]]
    a, b, g = angles[0], angles[1], angles[2]
    ca, sa, cb, sb, cg, sg = jnp.cos(a), jnp.sin(a), jnp.cos(b), jnp.sin(b), jnp.cos(g), jnp.sin(g)
    # R_2(g) R_1(b) R_0(a)
    return [[cg * cb, cg * sb * sa - sg * ca, cg * sb * ca + sg * sa],
            [sg * cb, sg * sb * sa + cg * ca, sg * sb * ca - cg * sa],
            [-sb, cb * sa, cb * ca]]


def _check_matrix(matrix, fn_name):
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] not in (3, 4):
        raise ValueError(f"{fn_name}: matrix must be (D+1, D+1) with D = 2 or 3, got {matrix.shape}")


def _split(params, ndim):
    n = num_params(ndim)
    sizes = [n["translation"], n["rotation"], n["scale"], n["shear"]]
    if params.shape != (sum(sizes),):
        raise ValueError(f"{ndim}D affine params must have shape ({sum(sizes)},), got {params.shape}")
    out, i = [], 0
    for s in sizes:
        out.append(params[i:i + s])
        i += s
    return out


def params_to_matrix(params: Float[Array, "P"], *, ndim: int, center=None) -> Float[Array, "D+1 D+1"]:
    """Homogeneous matrix from a parameter vector (see module docstring).

    Args:
      params: ``(P,)`` with P = 6 (2D) or 12 (3D).
      ndim: 2 or 3 (static).
      center: ``(D,)`` centre of rotation/scaling in voxels (default origin).

    Returns:
      ``(D+1, D+1)`` float matrix, last row ``[0, ..., 0, 1]``.

    Raises:
      ValueError: if ``params`` has the wrong length.
    """
    t, r, s, sh = _split(jnp.asarray(params, jnp.float32), ndim)
    rot = _rotation(r, ndim)
    # U = S Sh, upper triangular: row i is s_i times row i of the unit upper-triangular shear
    u = [[s[i] if i == j else None for j in range(ndim)] for i in range(ndim)]
    for k, (i, j) in enumerate(zip(*np.triu_indices(ndim, 1))):
        u[i][j] = s[i] * sh[k]
    lin = [[functools.reduce(jnp.add, [rot[i][k] * u[k][j] for k in range(j + 1)]) for j in range(ndim)]
           for i in range(ndim)]
    c = [0.0] * ndim if center is None else list(jnp.asarray(center, jnp.float32))
    offset = [c[i] + t[i] - functools.reduce(jnp.add, [lin[i][j] * c[j] for j in range(ndim)])
              for i in range(ndim)]
    rows = [jnp.stack([jnp.asarray(x, jnp.float32) for x in lin[i] + [offset[i]]]) for i in range(ndim)]
    return jnp.stack(rows + [jnp.asarray([0.0] * ndim + [1.0], jnp.float32)])


def matrix_to_params(matrix: Float[Array, "D+1 D+1"], *, center=None) -> Float[Array, "P"]:
    """Inverse of :func:`params_to_matrix` for matrices with a positive determinant.

    Decomposes the linear part by QR (``L = R U``, ``U = S Sh`` with a positive
    diagonal) and extracts Euler angles from ``R``.

    Args:
      matrix: ``(D+1, D+1)`` homogeneous matrix with ``det > 0``.
      center: the centre used in :func:`params_to_matrix`.

    Returns:
      ``(P,)`` parameters; ``params_to_matrix(matrix_to_params(A)) == A``.

    Raises:
      ValueError: if ``matrix`` is not ``(D+1, D+1)`` with D = 2 or 3.
    """
    _check_matrix(matrix, "matrix_to_params")
    d = matrix.shape[0] - 1
    lin = matrix[:d, :d]
    q, u = jnp.linalg.qr(lin)
    sign = jnp.sign(jnp.diag(u))
    q, u = q * sign[None, :], u * sign[:, None]
    scale = jnp.diag(u)
    sh = (u / scale[:, None])[jnp.triu_indices(d, 1)]
    if d == 2:
        rot = jnp.arctan2(q[1, 0], q[0, 0])[None]
    else:
        b = -jnp.arcsin(jnp.clip(q[2, 0], -1.0, 1.0))
        a = jnp.arctan2(q[2, 1], q[2, 2])
        g = jnp.arctan2(q[1, 0], q[0, 0])
        rot = jnp.stack([a, b, g])
    c = jnp.zeros(d) if center is None else jnp.asarray(center, matrix.dtype)
    t = matrix[:d, d] - c + lin @ c
    return jnp.concatenate([t, rot, scale, sh])


def fit_affine(
    src: Float[Array, "N D"], dst: Float[Array, "N D"], *, weights: Float[Array, "N"] | None = None,
    ridge: float = 0.0, prior: Float[Array, "D D"] | None = None,
) -> Float[Array, "D+1 D+1"]:
    """Closed-form weighted least-squares affine mapping ``src`` points onto ``dst``.

    Minimises ``sum_i w_i |A src_i + b - dst_i|^2``, plus with ``ridge > 0``
    the Tikhonov term ``ridge * (sum_i w_i / D) * s^2 |A - P|_F^2`` pulling the
    linear part ``A`` towards ``prior`` ``P`` (default the identity), with
    ``s`` the weighted RMS distance of ``src`` from its centroid. The term
    matters only along directions in which ``src`` spreads less than about
    ``sqrt(ridge / D) * s`` (there ``A`` takes ``P``'s columns), so nearly
    coplanar points give a well-posed fit (ours; KeyMorph's points of
    :func:`jaxreg.pipeline.keymorph_points` pass their rigid fit as ``P``).
    Points are centred and scaled internally for conditioning; differentiable
    (a linear solve).

    Args:
      src: ``(N, D)`` points, N >= D + 1 not all coplanar (unless ``ridge > 0``).
      dst: ``(N, D)`` corresponding points.
      weights: optional ``(N,)`` non-negative weights.
      ridge: ``>= 0``, dimensionless (0: eq. 3 as published).
      prior: ``(D, D)`` linear part the ridge pulls towards.

    Returns:
      ``(D+1, D+1)`` matrix ``A`` with ``dst ~= A [src; 1]``.

    Raises:
      ValueError: on mismatched shapes or too few points.

    References:
      Wang et al., "A robust and interpretable deep learning framework for
      multi-modal registration via keypoints" (KeyMorph), MedIA 2023, Eq. 3.
    """
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] not in (2, 3):
        raise ValueError(f"fit_affine: src and dst must both be (N, D), got {src.shape} and {dst.shape}")
    n, d = src.shape
    if n < d + 1:
        raise ValueError(f"fit_affine: need at least {d + 1} points in {d}D, got {n}")
    w = jnp.ones(n, src.dtype) if weights is None else jnp.asarray(weights, src.dtype)
    wsum = jnp.sum(w)
    mu_s = jnp.sum(w[:, None] * src, 0) / wsum
    mu_d = jnp.sum(w[:, None] * dst, 0) / wsum
    scale_s = jnp.sqrt(jnp.sum(w[:, None] * (src - mu_s) ** 2) / wsum) + 1e-12
    xs = (src - mu_s) / scale_s
    yd = dst - mu_d
    # Normal equations for the centred problem (translation decouples).
    xtx = (xs * w[:, None]).T @ xs
    xty = (xs * w[:, None]).T @ yd
    if ridge:
        if ridge < 0:
            raise ValueError(f"fit_affine: ridge must be >= 0, got {ridge}")
        p = jnp.eye(d, dtype=src.dtype) if prior is None else jnp.asarray(prior, src.dtype)
        mu = ridge * wsum / d
        xtx = xtx + mu * jnp.eye(d, dtype=src.dtype)
        xty = xty + mu * scale_s * p.T  # the prior in the scaled coordinates: (s P^T)
    lin = jnp.linalg.solve(xtx, xty).T / scale_s
    offset = mu_d - lin @ mu_s
    top = jnp.concatenate([lin, offset[:, None]], axis=1)
    bottom = jnp.concatenate([jnp.zeros((1, d), src.dtype), jnp.ones((1, 1), src.dtype)], axis=1)
    return jnp.concatenate([top, bottom], axis=0)


def fit_rigid(
    src: Float[Array, "N D"], dst: Float[Array, "N D"], *, weights: Float[Array, "N"] | None = None
) -> Float[Array, "D+1 D+1"]:
    """Closed-form weighted least-squares rigid map (rotation + translation) of ``src`` points onto ``dst``.

    Minimises ``sum_i w_i |R src_i + t - dst_i|^2`` over rotations ``R``
    (``det R = +1``: a reflection is never returned) by the SVD of the
    weighted cross-covariance (Arun, Huang & Blostein, IEEE TPAMI 1987;
    Umeyama 1991 for the reflection guard). Unlike :func:`fit_affine` it is
    well posed for coplanar points (any 3 non-collinear points fix it), which
    is what KeyMorph's official code offers as its rigid aligner.
    Differentiable almost everywhere (an SVD; not at repeated singular values).

    Args:
      src: ``(N, D)`` points, N >= D, D in (2, 3).
      dst: ``(N, D)`` corresponding points.
      weights: optional ``(N,)`` non-negative weights.

    Returns:
      ``(D+1, D+1)`` matrix with ``dst ~= R src + t``; ``R`` orthonormal, det +1.

    Raises:
      ValueError: on mismatched shapes or too few points.
    """
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] not in (2, 3):
        raise ValueError(f"fit_rigid: src and dst must both be (N, D), got {src.shape} and {dst.shape}")
    n, d = src.shape
    if n < d:
        raise ValueError(f"fit_rigid: need at least {d} points in {d}D, got {n}")
    w = jnp.ones(n, src.dtype) if weights is None else jnp.asarray(weights, src.dtype)
    wsum = jnp.sum(w)
    mu_s = jnp.sum(w[:, None] * src, 0) / wsum
    mu_d = jnp.sum(w[:, None] * dst, 0) / wsum
    cov = ((src - mu_s) * w[:, None]).T @ (dst - mu_d)  # (D, D): sum w (s - mu_s)(d - mu_d)^T
    u, _, vt = jnp.linalg.svd(cov)
    sign = jnp.sign(jnp.linalg.det(vt.T @ u.T))
    sign = jnp.where(sign == 0, 1.0, sign)
    rot = vt.T @ jnp.diag(jnp.concatenate([jnp.ones(d - 1, src.dtype), sign[None].astype(src.dtype)])) @ u.T
    offset = mu_d - rot @ mu_s
    top = jnp.concatenate([rot, offset[:, None]], axis=1)
    bottom = jnp.concatenate([jnp.zeros((1, d), src.dtype), jnp.ones((1, 1), src.dtype)], axis=1)
    return jnp.concatenate([top, bottom], axis=0)


def affine_to_disp(matrix: Float[Array, "D+1 D+1"], shape) -> Float[Array, "*spatial D"]:
    """Dense displacement of an affine map on a grid: ``u(x) = A x + b - x``.

    Args:
      matrix: ``(D+1, D+1)`` fixed-voxel -> moving-voxel matrix.
      shape: spatial shape (length D) of the fixed grid.

    Returns:
      ``(*shape, D)`` float32 displacement in voxels.

    Raises:
      ValueError: if ``matrix`` is not ``(D+1, D+1)`` or ``len(shape)`` does not match it.
    """
    _check_matrix(matrix, "affine_to_disp")
    d = matrix.shape[0] - 1
    if len(shape) != d:
        raise ValueError(f"affine_to_disp: {d + 1}x{d + 1} matrix but {len(shape)}D shape {tuple(shape)}")
    x = identity_grid(shape)
    m = jnp.asarray(matrix, jnp.float32)
    return x @ m[:d, :d].T + m[:d, d] - x
