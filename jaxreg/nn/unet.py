"""VoxelMorph-style U-Net and SVF registration network (Flax NNX).

Source: Balakrishnan et al., "VoxelMorph", IEEE TMI 2019 (Sec. III-B,
Fig. 3: encoder 3x3x3 convs with stride-2 downsampling (here max pooling, as
the voxelmorph package), decoder convs + nearest upsampling + skip
concatenation, LeakyReLU 0.2); Dalca et al., MICCAI 2018 / MedIA 2019
(diffeomorphic variant: the network outputs a stationary velocity field
integrated by scaling and squaring, optionally at half resolution).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from jaxreg.nn.blocks import ConvBlock, concat, max_pool, upsample_to
from jaxreg.nn.conv import conv_general_dilated
from jaxreg.spatial import gaussian_blur, integrate, resize_disp

VXM_ENC = (16, 32, 32, 32)
VXM_DEC = (32, 32, 32, 32)
VXM_FINAL = (32, 16, 16)


def field_to_disp(v, shape, *, int_steps: int, int_downsize: int):
    """Displacement on the grid ``shape`` from a network's field ``v`` ``(*grid, D)`` on its own (possibly coarser) grid.

    ``int_steps == 0``: ``v`` is the displacement, resized to ``shape``. Otherwise ``exp(v)`` by
    scaling and squaring on a grid ``int_downsize`` times coarser than ``shape``, resized back.
    ``resize_disp`` is the identity when the grids already match.
    """
    if int_steps == 0:
        return resize_disp(v, shape)
    small = tuple(max(2, math.ceil(s / int_downsize)) for s in shape)
    return resize_disp(integrate(resize_disp(v, small), steps=int_steps), shape)


class UNet(nnx.Module):
    """U-Net over ``(B, *spatial, in_channels)`` returning ``(B, *spatial / 2**out_level, final_features[-1])``.

    Spatial sizes must be divisible by ``2 ** len(enc_features)``.

    Args:
      ndim: 2 or 3.
      in_channels: input channels (2 for a concatenated fixed/moving pair).
      enc_features, dec_features: widths per level (same length), VoxelMorph
        defaults ``(16, 32, 32, 32)`` / ``(32, 32, 32, 32)``.
      final_features: widths of the convs after the decoder (at the output
        level's resolution).
      norm: instance normalisation in every block.
      out_level: resolution of the output, ``1 / 2 ** out_level`` of the
        input (0 = the input grid, as VoxelMorph). With ``out_level = k`` the
        decoder's last ``k`` upsampling + skip concatenations are left out,
        so those decoder blocks and the final convs run at ``1 / 2 ** k``
        resolution: at ``k = 1`` about 6x fewer FLOPs for the VoxelMorph
        widths, since ~85 % of them are the full-resolution convs.

    ``conditioned_features`` lists every block's width in call order: the
    shape of the FiLM parameters ``__call__`` accepts.

    Raises:
      ValueError: on mismatched widths, or an input of the wrong rank,
        channels or a size not divisible by ``2 ** levels``.
    """

    def __init__(self, ndim: int, in_channels: int, *, enc_features=VXM_ENC, dec_features=VXM_DEC,
                 final_features=VXM_FINAL, norm: bool = False, out_level: int = 0, rngs: nnx.Rngs):
        if len(enc_features) != len(dec_features) or not enc_features:
            raise ValueError(f"enc_features and dec_features need the same non-zero length, got "
                             f"{enc_features} and {dec_features}")
        if not 0 <= out_level <= len(enc_features):
            raise ValueError(f"out_level must be in [0, {len(enc_features)}], got {out_level}")
        self.ndim, self.in_channels = ndim, in_channels
        self.levels = len(enc_features)
        self.out_level = out_level
        enc, c = [], in_channels
        for f in enc_features:
            enc.append(ConvBlock(ndim, c, f, norm=norm, rngs=rngs))
            c = f
        dec = []
        for i, (f, skip) in enumerate(zip(dec_features, reversed(enc_features))):
            dec.append(ConvBlock(ndim, c, f, norm=norm, rngs=rngs))
            c = f + skip if self._joins(i) else f
        final = []
        for f in final_features:
            final.append(ConvBlock(ndim, c, f, norm=norm, rngs=rngs))
            c = f
        self.enc, self.dec, self.final = nnx.List(enc), nnx.List(dec), nnx.List(final)
        self.out_features = c
        self.conditioned_features = tuple(b.out_features for b in (*enc, *dec, *final))

    def _joins(self, i: int) -> bool:
        """Whether decoder block ``i`` is followed by upsampling + the skip of level ``levels - 1 - i``."""
        return self.levels - 1 - i >= self.out_level

    def __call__(self, x: Float[Array, "B *spatial C"], film=None) -> Float[Array, "B *spatial F"]:
        if x.ndim != self.ndim + 2 or x.shape[-1] != self.in_channels:
            raise ValueError(f"UNet expects (B, *spatial[{self.ndim}], {self.in_channels}), got {x.shape}")
        m = 2 ** self.levels
        if any(s % m for s in x.shape[1:-1]):
            raise ValueError(f"spatial size {x.shape[1:-1]} must be divisible by 2**levels = {m} "
                             f"(crop or pad, e.g. jaxreg.data.crop_or_pad)")
        film = list(film) if film is not None else [None] * len(self.conditioned_features)
        if len(film) != len(self.conditioned_features):
            raise ValueError(f"film needs {len(self.conditioned_features)} (gamma, beta) pairs, got {len(film)}")
        it = iter(film)
        skips = []
        for block in self.enc:
            x = block(x, next(it))
            skips.append(x)
            x = max_pool(x, self.ndim)
        for i, block in enumerate(self.dec):
            x = block(x, next(it))
            skip = skips.pop()
            if self._joins(i):
                x = concat(upsample_to(x, skip.shape[1:-1]), skip)
        for block in self.final:
            x = block(x, next(it))
        return x


class SVFNet(nnx.Module):
    """Registration network: ``(fixed, moving) -> velocity -> disp`` (diffeomorphic).

    ``__call__(fixed, moving, film=None)`` takes ``(B, *spatial, C)`` images
    and returns ``(velocity, disp, inverse_disp)``: ``velocity`` ``(B,
    *spatial, D)`` in voxels of the input grid; ``disp = exp(v)`` and
    ``inverse_disp = exp(-v)`` (``None`` unless ``bidirectional``), both
    ``(B, *spatial, D)`` voxel displacements (``warped(x) = moving(x +
    disp(x))``). With ``int_downsize = k > 1`` the velocity is resized to
    ``1/k`` of the grid (vectors rescaled), integrated there with
    ``int_steps`` squarings, and the result resized back (VoxelMorph's
    ``int_downsize=2``). With ``out_level = k`` the U-Net and the flow
    convolution stop at ``1 / 2 ** k`` resolution (see :class:`UNet`); the
    velocity is predicted there (voxels of that grid) and integrated there
    when ``int_downsize == 2 ** k`` (no full-resolution decoder).

    ``velocity_sigma > 0`` smooths the predicted velocity with a Gaussian
    (voxels of the grid it is predicted on) before integration: the network
    can only output smooth fields, the parametrisation ``v = G * p`` of the
    instance optimiser (``field_sigma``).

    The flow convolution starts at N(0, 1e-5) weights and zero bias, so an
    untrained network is close to the identity (VoxelMorph).
    """

    def __init__(self, ndim: int, in_channels: int = 1, *, enc_features=VXM_ENC, dec_features=VXM_DEC,
                 final_features=VXM_FINAL, norm: bool = False, int_steps: int = 7, int_downsize: int = 2,
                 bidirectional: bool = False, out_level: int = 0, velocity_sigma: float = 0.0, rngs: nnx.Rngs):
        if int_steps < 0 or int_downsize < 1:
            raise ValueError(f"int_steps must be >= 0 and int_downsize >= 1, got {int_steps}, {int_downsize}")
        if velocity_sigma < 0:
            raise ValueError(f"velocity_sigma must be >= 0, got {velocity_sigma}")
        self.velocity_sigma = float(velocity_sigma)
        self.ndim, self.in_channels = ndim, in_channels
        self.unet = UNet(ndim, 2 * in_channels, enc_features=enc_features, dec_features=dec_features,
                         final_features=final_features, norm=norm, out_level=out_level, rngs=rngs)
        self.flow = nnx.Conv(self.unet.out_features, ndim, (3,) * ndim, padding="SAME",
                             kernel_init=nnx.initializers.normal(1e-5), bias_init=nnx.initializers.zeros,
                             conv_general_dilated=conv_general_dilated, rngs=rngs)
        self.int_steps, self.int_downsize, self.bidirectional = int_steps, int_downsize, bidirectional
        self.conditioned_features = self.unet.conditioned_features

    def _exp(self, v, shape):
        return field_to_disp(v, shape, int_steps=self.int_steps, int_downsize=self.int_downsize)

    def __call__(self, fixed: Float[Array, "B *spatial C"], moving: Float[Array, "B *spatial C"], film=None,
                 *, inverse: bool | None = None):
        """``(velocity, disp, inverse_disp)``; ``inverse`` (default: ``bidirectional``) computes ``exp(-v)``."""
        if fixed.shape != moving.shape:
            raise ValueError(f"fixed and moving must have the same shape, got {fixed.shape} and {moving.shape}")
        shape = fixed.shape[1:-1]
        v = self.flow(self.unet(jnp.concatenate([moving, fixed], axis=-1), film))
        if self.velocity_sigma > 0:
            v = jax.vmap(lambda x: gaussian_blur(x, self.velocity_sigma))(v)
        disp = jax.vmap(lambda x: self._exp(x, shape))(v)
        want_inverse = self.bidirectional if inverse is None else inverse
        inv = jax.vmap(lambda x: self._exp(-x, shape))(v) if want_inverse else None
        return jax.vmap(lambda x: resize_disp(x, shape))(v), disp, inv
