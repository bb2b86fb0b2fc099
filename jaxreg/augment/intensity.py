"""Keyed, jittable intensity augmentation of ``(*spatial, C)`` images in [0, 1] (labels are unaffected)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


def random_gamma(key: PRNGKeyArray, image: Float[Array, "*spatial C"], *, log_gamma_std: float = 0.3):
    """``image ** gamma`` with ``log(gamma) ~ N(0, log_gamma_std)`` (image clipped to [0, 1] first)."""
    g = jnp.exp(log_gamma_std * jax.random.normal(key, ()))
    return jnp.clip(image, 0.0, 1.0) ** g


def random_bias_field(key: PRNGKeyArray, image: Float[Array, "*spatial C"], *, strength: float = 0.3,
                      control_points: int = 4):
    """Multiply by a smooth field ``exp(b)``, ``b`` = cubic upsampling of N(0, strength) on a
    ``control_points^D`` grid (an MRI bias field)."""
    d = image.ndim - 1
    coarse = strength * jax.random.normal(key, (control_points,) * d)
    field = jnp.exp(jax.image.resize(coarse, image.shape[:-1], "cubic"))
    return image * field[..., None]


def random_noise(key: PRNGKeyArray, image: Float[Array, "*spatial C"], *, std: float = 0.02):
    """Add white Gaussian noise with standard deviation ``U(0, std)``."""
    k1, k2 = jax.random.split(key)
    return image + jax.random.uniform(k1, (), maxval=std) * jax.random.normal(k2, image.shape)
