"""Convolution blocks for registration networks (Flax NNX, channels last)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from jaxreg.nn.conv import conv_general_dilated

LEAKY_SLOPE = 0.2  # VoxelMorph (Balakrishnan et al., IEEE TMI 2019, Sec. III-B)


class ConvBlock(nnx.Module):
    """3x3(x3) convolution, optional instance norm, optional FiLM, LeakyReLU(0.2).

    Input/output ``(B, *spatial, C)`` float, ``len(spatial) == ndim`` (2 or 3).
    ``film = (gamma, beta)``, each ``(B, out_features)``, modulates the
    normalised pre-activation as ``x * (1 + gamma) + beta`` (FiLM, Perez et
    al., AAAI 2018; the ``1 +`` makes zero conditioning the identity).

    Raises:
      ValueError: on an input of the wrong rank or channel count.
    """

    def __init__(self, ndim: int, in_features: int, out_features: int, *, stride: int = 1,
                 norm: bool = False, rngs: nnx.Rngs):
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        self.ndim, self.in_features, self.out_features = ndim, in_features, out_features
        self.conv = nnx.Conv(in_features, out_features, (3,) * ndim, strides=stride, padding="SAME",
                             conv_general_dilated=conv_general_dilated, rngs=rngs)
        self.norm = nnx.GroupNorm(out_features, num_groups=out_features, use_bias=False, use_scale=False,
                                  epsilon=1e-5, rngs=rngs) if norm else None

    def __call__(self, x: Float[Array, "B *spatial C"], film=None) -> Float[Array, "B *spatial F"]:
        if x.ndim != self.ndim + 2 or x.shape[-1] != self.in_features:
            raise ValueError(f"ConvBlock expects (B, *spatial[{self.ndim}], {self.in_features}), got {x.shape}")
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if film is not None:
            gamma, beta = film
            bshape = (x.shape[0],) + (1,) * self.ndim + (x.shape[-1],)
            x = x * (1.0 + gamma.reshape(bshape)) + beta.reshape(bshape)
        return jax.nn.leaky_relu(x, LEAKY_SLOPE)


def max_pool(x: Float[Array, "B *spatial C"], ndim: int) -> Float[Array, "B *half C"]:
    """2x max pooling over the spatial axes (odd sizes floor, as VoxelMorph)."""
    w = (2,) * ndim
    return nnx.max_pool(x, window_shape=w, strides=w, padding="VALID")


def upsample_to(x: Float[Array, "B *spatial C"], shape) -> Float[Array, "B *shape C"]:
    """Nearest-neighbour upsampling of the spatial axes to ``shape`` (VoxelMorph's Upsample)."""
    return jax.image.resize(x, (x.shape[0], *shape, x.shape[-1]), method="nearest")


def concat(a, b):
    return jnp.concatenate([a, b], axis=-1)
