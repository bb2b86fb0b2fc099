"""Scaling and squaring: the exponential of a stationary velocity field."""
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxreg.spatial.warp import _check_disp, warp


def integrate(velocity: Float[Array, "*spatial D"], *, steps: int = 7) -> Float[Array, "*spatial D"]:
    """Displacement of ``phi = exp(v)`` by scaling and squaring.

    ``u_0 = v / 2^steps``; ``u_{k+1} = u_k + u_k(x + u_k(x))`` (``steps``
    self-compositions, linear interpolation, border padding). The inverse map
    is ``exp(-v)``: ``integrate(-velocity)``. Loops run in ``lax.fori_loop``
    (one compiled body, whatever ``steps`` is).

    Args:
      velocity: ``(*spatial, D)`` stationary velocity field (voxels per unit time).
      steps: number of squarings (static); error decreases as ``2^-steps``.

    Returns:
      ``(*spatial, D)`` displacement of ``exp(v)`` in voxels.

    Raises:
      ValueError: on bad shapes or ``steps < 0``.

    References:
      Arsigny et al., "A Log-Euclidean framework for statistics on
      diffeomorphisms", MICCAI 2006, Sec. 3; Ashburner, "A fast diffeomorphic
      image registration algorithm" (DARTEL), NeuroImage 2007.
    """
    _check_disp(velocity, "velocity")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    u = velocity / (2.0 ** steps)
    return jax.lax.fori_loop(0, steps, lambda _, u: u + warp(u, u, padding="border"), u)
