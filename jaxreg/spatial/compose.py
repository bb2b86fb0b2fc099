"""Composition, inversion and resizing of displacement fields."""
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxreg.spatial.warp import _check_disp, warp


def compose(disp_a: Float[Array, "*spatial D"], disp_b: Float[Array, "*spatial D"]) -> Float[Array, "*spatial D"]:
    """Displacement of ``phi_a o phi_b``: ``u(x) = u_b(x) + u_a(x + u_b(x))``.

    Warping by the result equals warping by ``disp_a`` and then by ``disp_b``:
    ``warp(warp(m, disp_a), disp_b) ~= warp(m, compose(disp_a, disp_b))``.
    ``disp_a`` is sampled with linear interpolation and border padding.

    Args:
      disp_a: ``(*spatial, D)`` outer displacement (voxels).
      disp_b: ``(*spatial, D)`` inner displacement (voxels).

    Returns:
      ``(*spatial, D)`` displacement of the composed map.

    Raises:
      ValueError: if the shapes differ or are not ``(*spatial, D)``.
    """
    _check_disp(disp_a, "disp_a")
    _check_disp(disp_b, "disp_b")
    if disp_a.shape != disp_b.shape:
        raise ValueError(f"compose: shapes differ, {disp_a.shape} vs {disp_b.shape}")
    return disp_b + warp(disp_a, disp_b, padding="border")


def invert(disp: Float[Array, "*spatial D"], *, iterations: int = 20) -> Float[Array, "*spatial D"]:
    """Inverse displacement by fixed-point iteration ``v <- -u(x + v(x))``.

    Converges when ``u`` is a contraction (``max |grad u| < 1``), i.e. for
    diffeomorphic, not-too-large fields; the residual ``|compose(u, v)|``
    shrinks geometrically.

    Args:
      disp: ``(*spatial, D)`` displacement (voxels).
      iterations: number of fixed-point steps (static).

    Returns:
      ``(*spatial, D)`` ``v`` with ``x + v(x) + u(x + v(x)) ~= x``.

    References:
      Chen et al., "A simple fixed-point approach to invert a deformation
      field", Med. Phys. 35(1), 2008.
    """
    _check_disp(disp)
    v0 = -disp
    return jax.lax.fori_loop(0, iterations, lambda _, v: -warp(disp, v, padding="border"), v0)


def resize_disp(disp: Float[Array, "*spatial D"], shape) -> Float[Array, "*new_spatial D"]:
    """Resample a displacement field to a new grid and rescale its vectors.

    Both grids cover the same physical extent with voxel centres aligned as in
    ``jax.image.resize`` (``x_new = (x_old + 0.5) * s - 0.5``), so a vector
    component along axis ``i`` is multiplied by ``s_i = new_i / old_i``.

    Args:
      disp: ``(*spatial, D)`` displacement (voxels of the old grid).
      shape: new spatial shape (length D).

    Returns:
      ``(*shape, D)`` displacement in voxels of the new grid.

    Raises:
      ValueError: if ``len(shape) != D``.
    """
    _check_disp(disp)
    d = disp.shape[-1]
    shape = tuple(int(s) for s in shape)
    if len(shape) != d:
        raise ValueError(f"resize_disp: new shape {shape} has not {d} axes")
    if shape == disp.shape[:-1]:
        return disp
    scale = jnp.asarray([n / o for n, o in zip(shape, disp.shape[:-1])], disp.dtype)
    return jax.image.resize(disp, shape + (d,), method="linear") * scale
