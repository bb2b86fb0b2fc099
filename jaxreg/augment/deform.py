"""Random smooth diffeomorphic deformations (stationary velocity fields)."""
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from jaxreg.spatial import integrate


def random_velocity(
    key: PRNGKeyArray,
    shape,
    *,
    mean_magnitude: float = 2.0,
    control_spacing: int = 16,
) -> Float[Array, "*spatial D"]:
    """A random smooth stationary velocity field.

    White Gaussian noise on a control grid with ``control_spacing`` voxels
    between points is upsampled (cubic) to ``shape`` and scaled so that the
    mean vector length over the grid is ``mean_magnitude`` voxels.

    Args:
      key: ``jax.random.key``.
      shape: spatial shape (D = 2 or 3 axes).
      mean_magnitude: mean |v| in voxels (>= 0).
      control_spacing: control-point spacing in voxels (larger = smoother).

    Returns:
      ``(*shape, D)`` float32 velocity in voxels.

    Raises:
      ValueError: on a bad shape or negative magnitude.

    References:
      Hoffmann et al., "SynthMorph", IEEE TMI 2022, Sec. II-C (random SVFs
      from upsampled noise, integrated by scaling and squaring).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"shape must have 2 or 3 axes, got {shape}")
    if mean_magnitude < 0:
        raise ValueError(f"mean_magnitude must be >= 0, got {mean_magnitude}")
    d = len(shape)
    coarse = tuple(max(2, -(-s // control_spacing) + 1) for s in shape)
    noise = jax.random.normal(key, coarse + (d,), jnp.float32)
    v = jax.image.resize(noise, shape + (d,), method="cubic")
    mag = jnp.mean(jnp.linalg.norm(v, axis=-1))
    return v * (mean_magnitude / jnp.maximum(mag, 1e-12))


def random_deformation(
    key: PRNGKeyArray,
    shape,
    *,
    mean_magnitude: float = 2.0,
    control_spacing: int = 16,
    steps: int = 7,
) -> tuple[Float[Array, "*spatial D"], Float[Array, "*spatial D"]]:
    """A random diffeomorphism and its inverse: ``(exp(v), exp(-v))`` displacements.

    Args:
      key, shape, mean_magnitude, control_spacing: as :func:`random_velocity`.
      steps: scaling-and-squaring steps.

    Returns:
      ``(disp, inverse_disp)``, each ``(*shape, D)`` float32 in voxels.
    """
    v = random_velocity(key, shape, mean_magnitude=mean_magnitude, control_spacing=control_spacing)
    return integrate(v, steps=steps), integrate(-v, steps=steps)
