"""Smoothness regularisers for displacement and velocity fields."""
import itertools

import jax.numpy as jnp
from jaxtyping import Array, Float

Disp = Float[Array, "*spatial D"]


def _check_field(field, name: str) -> Array:
    """Checks a ``(*spatial, D)`` field with ``D = len(spatial)`` in {2, 3}."""
    field = jnp.asarray(field)
    if not jnp.issubdtype(field.dtype, jnp.floating):
        field = field.astype(jnp.float32)
    d = field.ndim - 1
    if d not in (2, 3) or field.shape[-1] != d:
        raise ValueError(
            f"{name} must be (*spatial, D) with D = len(spatial) in (2, 3), got "
            f"shape {field.shape}"
        )
    return field


def _diff(x: Array, axis: int) -> Array:
    """Forward difference ``x[i + 1] - x[i]`` along ``axis`` (length - 1)."""
    return jnp.diff(x, axis=axis)


def diffusion(disp: Disp) -> Float[Array, ""]:
    """Diffusion regulariser: mean squared Frobenius norm of the Jacobian of u.

    Computes ``sum_k mean_x sum_i (d_k u_i)^2`` with forward differences
    ``d_k u(x) = u(x + e_k) - u(x)``, each averaged over the voxels where it is
    defined (``n_k - 1`` along axis ``k``). Forward differences are exact for
    linear fields: ``u(x) = A x + t`` gives exactly ``sum(A**2)``.
    (VoxelMorph's ``Grad('l2')`` divides this by ``D^2``: it averages over
    components and axes instead of summing.)

    Args:
      disp: ``[*spatial, D]`` displacement in voxels, ``D = len(spatial)``.

    Returns:
      Scalar penalty ``>= 0`` (voxels^2 per voxel^2, i.e. unitless); 0 for
      translations.

    Raises:
      ValueError: if ``disp`` is not ``(*spatial, D)`` with ``D`` in (2, 3).

    References:
      Fischer & Modersitzki, "Fast diffusion registration", AMS Contemporary
      Mathematics 313, 2002 (the diffusion regulariser ``1/2 sum |grad u_i|^2``);
      Balakrishnan et al., "VoxelMorph", IEEE TMI 2019, Sec. III-C (smoothness
      loss).
    """
    disp = _check_field(disp, "disp")
    d = disp.ndim - 1
    return sum(jnp.mean(jnp.sum(_diff(disp, k) ** 2, axis=-1)) for k in range(d))


def bending_energy(disp: Disp) -> Float[Array, ""]:
    """Bending energy: mean squared Frobenius norm of the Hessian of each u_i.

    Computes ``sum_i [sum_k (d_kk u_i)^2 + 2 sum_{k<l} (d_kl u_i)^2]`` with
    ``d_kk`` the central second difference ``u(x + e_k) - 2 u(x) + u(x - e_k)``
    and ``d_kl`` the mixed forward difference ``d_k d_l u``; each term is
    averaged over the voxels where it is defined (interior for ``d_kk``). Both
    stencils are exact for quadratic fields, so affine fields give exactly 0
    and ``u_i(x) = x^T B_i x / 2`` gives ``sum_i |B_i|_F^2``.

    Args:
      disp: ``[*spatial, D]`` displacement in voxels, ``D = len(spatial)``;
        each spatial axis needs >= 3 voxels.

    Returns:
      Scalar penalty ``>= 0`` (voxel^-2); 0 for affine fields.

    Raises:
      ValueError: if ``disp`` is not ``(*spatial, D)`` with ``D`` in (2, 3) or
        a spatial axis has < 3 voxels.

    References:
      Rueckert et al., "Nonrigid registration using free-form deformations:
      application to breast MR images", IEEE TMI 18(8) 1999 (the smoothness
      penalty C_smooth, the bending energy of a thin plate; integrated here
      by finite differences).
    """
    disp = _check_field(disp, "disp")
    d = disp.ndim - 1
    if min(disp.shape[:-1]) < 3:
        raise ValueError(
            f"bending_energy needs >= 3 voxels along every spatial axis, got "
            f"shape {disp.shape}"
        )
    total = 0.0
    for k in range(d):
        second = _diff(_diff(disp, k), k)
        total = total + jnp.mean(jnp.sum(second**2, axis=-1))
    for k, l in itertools.combinations(range(d), 2):
        mixed = _diff(_diff(disp, k), l)
        total = total + 2 * jnp.mean(jnp.sum(mixed**2, axis=-1))
    return total


def velocity_l2(velocity: Float[Array, "*spatial D"]) -> Float[Array, ""]:
    """Mean squared magnitude of a velocity (or displacement) field.

    Computes ``mean_x |v(x)|^2 = mean_x sum_i v_i(x)^2``.

    Args:
      velocity: ``[*spatial, D]`` stationary velocity field in voxels,
        ``D = len(spatial)``.

    Returns:
      Scalar penalty ``>= 0`` (voxels^2); 0 only for ``v = 0``.

    Raises:
      ValueError: if ``velocity`` is not ``(*spatial, D)`` with ``D`` in (2, 3).

    References:
      Dalca et al., "Unsupervised learning of probabilistic diffeomorphic
      registration for images and surfaces", MedIA 57 2019 (the prior on the
      stationary velocity field, whose diagonal part is ``|v|^2``).
    """
    velocity = _check_field(velocity, "velocity")
    return jnp.mean(jnp.sum(velocity**2, axis=-1))
