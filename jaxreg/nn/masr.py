"""MASR-Net: the DNS feature network (encoder-decoder + deep neighbourhood self-similarity + feature squeezing).

Source: Mok et al., "Modality-Agnostic Structural Image Representation
Learning for Deformable Multi-Modality Medical Image Registration", CVPR 2024,
Sec. 3.2 and supplementary Figs. 5-6: a 4-level encoder-decoder with skip
connections, (3D) convolutions with LeakyReLU, BlurPool downsampling and
(tri)linear upsampling (maximum stride 8) gives the feature map ``h``
(``C_h`` channels); DNS (:func:`jaxreg.losses.dns`, 24 channels per feature
channel in 3D) is squeezed by a linear layer over ``C_h`` to ``h^c`` (24
channels) and a head of two 3^d convolutions with LeakyReLU in between gives
the DSIR ``D`` with ``C_d = 24`` channels.

The paper's per-level widths are in its Fig. 5, which is not in the text we
have; the widths here are ours, chosen so that a 2 mm brain (120x120x78)
is described in about a second on 2 CPU cores (design.md, DNS).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from jaxreg.losses.dns import dns_pairs, dns_squeezed
from jaxreg.nn.blocks import LEAKY_SLOPE, ConvBlock, concat
from jaxreg.nn.conv import conv_general_dilated

MASR_ENC = (8, 16, 32, 32)   # widths at 1, 1/2, 1/4, 1/8 resolution (ours)
MASR_DEC = (32, 16, 8)       # decoder at 1/4, 1/2, 1; the last is C_h


def blur_pool(x: Float[Array, "B *spatial C"], ndim: int) -> Float[Array, "B *half C"]:
    """Anti-aliased 2x downsampling (BlurPool): binomial ``[1, 2, 1] / 4`` blur per axis, then stride 2.

    Reflect padding; odd sizes round up (``ceil(n / 2)``).

    References:
      Zhang, "Making convolutional networks shift-invariant again", ICML 2019
      (the "Tri-3" filter).
    """
    for ax in range(1, ndim + 1):
        n = x.shape[ax]
        pad = [(0, 0)] * x.ndim
        pad[ax] = (1, 1)
        xp = jnp.pad(x, pad, mode="reflect") if n > 1 else jnp.pad(x, pad, mode="edge")
        sl = lambda s: jax.lax.slice_in_dim(xp, s, s + n, axis=ax)
        blurred = 0.25 * sl(0) + 0.5 * sl(1) + 0.25 * sl(2)
        x = jax.lax.slice_in_dim(blurred, 0, n, stride=2, axis=ax)
    return x


def _upsample_linear(x, shape):
    return jax.image.resize(x, (x.shape[0], *shape, x.shape[-1]), method="linear")


class MASRNet(nnx.Module):
    """MASR-Net: image ``(B, *spatial, in_channels)`` -> DSIR ``(B, *spatial, out_channels)``.

    Any spatial size works (BlurPool rounds up, upsampling returns to each
    skip's exact size).

    Args:
      ndim: 2 or 3.
      in_channels: image channels (1).
      enc_features: widths of the 4 encoder levels (full, 1/2, 1/4, 1/8).
      dec_features: widths of the decoder levels (1/4, 1/2, full); the last
        is ``C_h``, the channels of ``h``.
      dilations: DNS layouts (``(1, 2)``: direct and dilated neighbourhood,
        DNS Sec. 3.2 "duo layout"; ``(1,)`` for the single-layout ablation,
        Table 5).
      squeeze_hidden: width of the feature-squeezing head's hidden conv (ours: 8; at
        2 mm the head took 1.0 s with 8 and 1.7 s with 16 on 2 CPU cores).
      out_channels: ``C_d`` (DNS Sec. 4.2: 24).
      use_dns: False gives the "MASR-Net w/o DNS" ablation (Table 5): the
        squeezing head acts on ``h`` directly.

    Raises:
      ValueError: on an input of the wrong rank or channel count.
    """

    def __init__(self, ndim: int, in_channels: int = 1, *, enc_features=MASR_ENC, dec_features=MASR_DEC,
                 dilations=(1, 2), squeeze_hidden: int = 8, out_channels: int = 24, use_dns: bool = True,
                 rngs: nnx.Rngs):
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        if len(enc_features) != 4 or len(dec_features) != 3:
            raise ValueError(f"MASR-Net has 4 encoder and 3 decoder levels, got {enc_features} and {dec_features}")
        self.ndim, self.in_channels = ndim, in_channels
        self.dilations, self.use_dns = tuple(dilations), use_dns
        enc, c = [], in_channels
        for f in enc_features:
            enc.append(ConvBlock(ndim, c, f, rngs=rngs))
            c = f
        dec = []
        for f, skip in zip(dec_features, reversed(enc_features[:-1])):
            dec.append(ConvBlock(ndim, c + skip, f, rngs=rngs))
            c = f
        self.enc, self.dec = nnx.List(enc), nnx.List(dec)
        self.feature_channels = c
        self.num_pairs = len(dns_pairs(ndim, self.dilations))
        k = self.num_pairs if use_dns else c
        # linear layer over C_h (shared by the DNS channels) -> h^c with K channels
        self.squeeze = nnx.Linear(c, 1, rngs=rngs) if use_dns else None
        kw = dict(padding="SAME", conv_general_dilated=conv_general_dilated, rngs=rngs)
        self.head1 = nnx.Conv(k, squeeze_hidden, (3,) * ndim, **kw)
        self.head2 = nnx.Conv(squeeze_hidden, out_channels, (3,) * ndim, **kw)
        self.out_channels = out_channels

    def features(self, x: Float[Array, "B *spatial C"]) -> Float[Array, "B *spatial Ch"]:
        """The encoder-decoder's feature map ``h``."""
        if x.ndim != self.ndim + 2 or x.shape[-1] != self.in_channels:
            raise ValueError(f"MASRNet expects (B, *spatial[{self.ndim}], {self.in_channels}), got {x.shape}")
        skips = []
        for i, block in enumerate(self.enc):
            x = block(x)
            if i < len(self.enc) - 1:
                skips.append(x)
                x = blur_pool(x, self.ndim)
        for block, skip in zip(self.dec, reversed(skips)):
            x = block(concat(_upsample_linear(x, skip.shape[1:-1]), skip))
        return x

    def __call__(self, x: Float[Array, "B *spatial C"]) -> Float[Array, "B *spatial Cd"]:
        h = self.features(x)
        if self.use_dns:
            w, b = self.squeeze.kernel[:, 0], self.squeeze.bias[0]
            # a loop over the (static) batch, not vmap: on 2 CPU cores vmap made the pass 1.8x slower at
            # batch 1 (1.26 vs 0.71 s for 112x128x112x8) and 1.4x at batch 4 of 48^3
            hc = jnp.stack([dns_squeezed(hb, w, b, dilations=self.dilations) for hb in h])
        else:
            hc = h
        return self.head2(jax.nn.leaky_relu(self.head1(hc), LEAKY_SLOPE))
