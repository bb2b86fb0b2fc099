"""CAR's registration network: Siamese encoders, a joint decoder with skips from both, a latent projection head.

Source: Wang et al., "CAR: Contrast-Agnostic Deformable Medical Image
Registration with Contrast-Invariant Latent Regularization", WBIR 2024,
Sec. 2.3 and Fig. 1 (two Siamese encoders for the moving and the fixed image,
latent representations at 1/16 of the image size, concatenated and decoded
to the deformation; skip connections from both encoders; a projection head
for the contrast-invariant latent regularisation) and Sec. 3
"Implementation details" (encoder convolutions 128 channels, decoder 256,
projection head a 1x1 convolution to 32 channels). Checked against the
official code (Yinsong0510/CAR): the two encoders share their weights
(Siamese), every block is conv 3^d + LeakyReLU(0.2) followed by 2x max
pooling in the encoder and nearest upsampling in the decoder, three more
full-resolution convolutions follow the decoder, the projections are
L2-normalised per location, and the network outputs a displacement field
(``int_steps=0``); an SVF integrated by scaling and squaring is an option here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from jaxreg.losses.infonce import unit_normalize
from jaxreg.nn.blocks import ConvBlock, max_pool, upsample_to
from jaxreg.nn.conv import conv_general_dilated
from jaxreg.nn.unet import field_to_disp
from jaxreg.spatial import invert, resize_disp

CAR_ENC = (128, 128, 128, 128)  # CAR Sec. 3: 128 channels in each encoder
CAR_DEC = (256, 256, 256, 256)  # and 256 in the decoder
CAR_FINAL = (256, 256, 256)  # official code: dec_nf = [256] * 7 (4 decoder + 3 full-resolution convs)


class SiameseRegNet(nnx.Module):
    """``(fixed, moving) -> (field, disp, inverse_disp, proj_fixed, proj_moving)`` for ``(B, *spatial, C)`` images.

    * The shared encoder: ``len(enc_features)`` conv blocks, each followed by
      2x max pooling; the block outputs are the skips and the last pooled
      map is the latent ``(B, *spatial / 2**levels, enc_features[-1])``
      (1/16 for CAR's 4 levels).
    * The projection head: a 1x1 conv of the latent to ``proj_features``
      channels, L2-normalised per location (``proj_*``, ``(B, *latent,
      proj_features)``, float32, unit vectors).
    * The decoder: the concatenated latents ``[moving, fixed]`` pass
      ``len(dec_features)`` conv blocks, each followed by nearest upsampling
      and the concatenation of both encoders' skips of that level; then the
      ``final_features`` blocks and a 3^d flow conv (N(0, 1e-5) weights,
      zero bias: an untrained network is near the identity).
    * ``out_level = k`` stops the decoder at ``1 / 2**k`` resolution (the
      last ``k`` skips are left out; the official code's ``half_res`` for
      ``k = 1``); the field is resized to the input grid.
    * ``int_steps = 0`` (CAR): ``field`` is the displacement itself and
      ``inverse_disp`` its fixed-point inverse. ``int_steps > 0``: ``field``
      is a velocity, ``disp = exp(v)`` and ``inverse_disp = exp(-v)`` by
      scaling and squaring on a grid ``int_downsize`` times coarser.

    All fields are ``(B, *spatial, D)`` in voxels of the input grid
    (``warped(x) = moving(x + disp(x))``); ``inverse_disp`` is None unless
    ``inverse=True``.

    Raises:
      ValueError: mismatched widths, bad ``out_level``/``int_steps``, inputs of
        the wrong rank/channels, different shapes, or sizes not divisible by
        ``2 ** levels``.
    """

    def __init__(self, ndim: int, in_channels: int = 1, *, enc_features=CAR_ENC, dec_features=CAR_DEC,
                 final_features=CAR_FINAL, proj_features: int = 32, out_level: int = 0, int_steps: int = 0,
                 int_downsize: int = 2, rngs: nnx.Rngs):
        if len(enc_features) != len(dec_features) or not enc_features:
            raise ValueError(f"enc_features and dec_features need the same non-zero length, got "
                             f"{enc_features} and {dec_features}")
        if not 0 <= out_level < len(enc_features):
            raise ValueError(f"out_level must be in [0, {len(enc_features) - 1}], got {out_level}")
        if int_steps < 0 or int_downsize < 1:
            raise ValueError(f"int_steps must be >= 0 and int_downsize >= 1, got {int_steps}, {int_downsize}")
        if proj_features < 1:
            raise ValueError(f"proj_features must be >= 1, got {proj_features}")
        self.ndim, self.in_channels, self.levels = ndim, in_channels, len(enc_features)
        self.out_level, self.int_steps, self.int_downsize = out_level, int_steps, int_downsize
        enc, c = [], in_channels
        for f in enc_features:
            enc.append(ConvBlock(ndim, c, f, rngs=rngs))
            c = f
        self.proj = nnx.Conv(c, proj_features, (1,) * ndim, conv_general_dilated=conv_general_dilated, rngs=rngs)
        dec, c = [], 2 * c
        for i, (f, skip) in enumerate(zip(dec_features, reversed(enc_features))):
            dec.append(ConvBlock(ndim, c, f, rngs=rngs))
            c = f + 2 * skip if self._joins(i) else f
        final = []
        for f in final_features:
            final.append(ConvBlock(ndim, c, f, rngs=rngs))
            c = f
        self.enc, self.dec, self.final = nnx.List(enc), nnx.List(dec), nnx.List(final)
        self.flow = nnx.Conv(c, ndim, (3,) * ndim, padding="SAME", kernel_init=nnx.initializers.normal(1e-5),
                             bias_init=nnx.initializers.zeros, conv_general_dilated=conv_general_dilated, rngs=rngs)

    def _joins(self, i: int) -> bool:
        return self.levels - 1 - i >= self.out_level

    def _check(self, x, what):
        if x.ndim != self.ndim + 2 or x.shape[-1] != self.in_channels:
            raise ValueError(f"{what} must be (B, *spatial[{self.ndim}], {self.in_channels}), got {x.shape}")
        m = 2 ** self.levels
        if any(s % m for s in x.shape[1:-1]):
            raise ValueError(f"spatial size {x.shape[1:-1]} must be divisible by 2**levels = {m}")

    def encode(self, x: Float[Array, "B *spatial C"]):
        """``(skips, latent, projection)`` of one image batch (the Siamese encoder and the projection head)."""
        self._check(x, "image")
        skips = []
        for block in self.enc:
            x = block(x)
            skips.append(x)
            x = max_pool(x, self.ndim)
        return skips, x, unit_normalize(self.proj(x))

    def _exp(self, v, shape):
        return field_to_disp(v, shape, int_steps=self.int_steps, int_downsize=self.int_downsize)

    def _inverse(self, v, shape):
        if self.int_steps == 0:
            return invert(resize_disp(v, shape))
        return self._exp(-v, shape)

    def __call__(self, fixed: Float[Array, "B *spatial C"], moving: Float[Array, "B *spatial C"], *,
                 inverse: bool = False):
        if fixed.shape != moving.shape:
            raise ValueError(f"fixed and moving must have the same shape, got {fixed.shape} and {moving.shape}")
        self._check(fixed, "fixed")
        shape = fixed.shape[1:-1]
        skips_m, lat_m, proj_m = self.encode(moving)
        skips_f, lat_f, proj_f = self.encode(fixed)
        x = jnp.concatenate([lat_m, lat_f], axis=-1)
        for i, block in enumerate(self.dec):
            x = block(x)
            sm, sf = skips_m.pop(), skips_f.pop()
            if self._joins(i):
                x = jnp.concatenate([upsample_to(x, sm.shape[1:-1]), sm, sf], axis=-1)
        for block in self.final:
            x = block(x)
        v = self.flow(x)
        disp = jax.vmap(lambda a: self._exp(a, shape))(v)
        inv = jax.vmap(lambda a: self._inverse(a, shape))(v) if inverse else None
        field = jax.vmap(lambda a: resize_disp(a, shape))(v)
        return field, disp, inv, proj_f, proj_m
