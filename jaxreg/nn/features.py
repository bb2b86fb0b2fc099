"""Pretrained feature extractors of learned similarities: ContraReg's autoencoder and DeepSim's feature network.

Both are trained on a surrogate task first (``jaxreg.methods.features``) and
then frozen inside a registration loss (``jaxreg.methods.contrareg``,
``jaxreg.methods.deepsim``). Images are ``(B, *spatial, 1)`` float32,
channels last, 2D or 3D; spatial sizes must be divisible by 8.

Sources:
  Dey, Schlemper, Salehi, Zhou, Gerig, Sofka, "ContraReg: Contrastive
  Learning of Multi-modality Unsupervised Deformable Image Registration",
  MICCAI 2022 (../shared/papers/contrareg_dey2022.md), Sec. 3 "Unsupervised
  pre-training" and Sec. 4 "Implementation details": 7 Conv-IN-LeakyReLU(0.2)
  blocks with 3 down/up samplings, filters 32-64-128-64-32-32-32-1, the
  post-convolution features of the first 6 layers are sampled.
  Czolbe, Krause, Feragen, "DeepSim: Semantic similarity metrics for learned
  image registration", MIDL 2021 (../shared/papers/deepsim_czolbe2021.md),
  Sec. 4: U-Net with three encoder and decoder stages, each one batch norm,
  two convolutions and one dropout layer, LeakyReLU, three smoothing
  convolutions after the last decoder stage, 64-128-256 channels in 2D and
  32-64-128 in 3D; the auto-encoder has no shortcut connections; features are
  taken from the encoding branch (Sec. 3, "Feature extraction").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from jaxreg.nn.blocks import LEAKY_SLOPE, ConvBlock, concat, max_pool
from jaxreg.nn.conv import conv_general_dilated

CONTRAREG_AE_FEATURES = (32, 64, 128, 64, 32, 32, 32)  # Sec. 4; the output conv has 1 filter
DEEPSIM_FEATURES_2D = (64, 128, 256)  # Sec. 4
DEEPSIM_FEATURES_3D = (32, 64, 128)


def _check(x, ndim, channels, multiple, name):
    if x.ndim != ndim + 2 or x.shape[-1] != channels:
        raise ValueError(f"{name} expects (B, *spatial[{ndim}], {channels}), got {x.shape}")
    if any(s % multiple for s in x.shape[1:-1]):
        raise ValueError(f"{name}: spatial size {x.shape[1:-1]} must be divisible by {multiple}")


def _resize(x, shape):
    return jax.image.resize(x, (x.shape[0], *shape, x.shape[-1]), method="linear")


class ContraRegAutoencoder(nnx.Module):
    """ContraReg's modality-specific autoencoder (Sec. 3 and 4).

    Layers, in call order (``features`` = 32-64-128-64-32-32-32, each a
    3x3(x3) conv + instance norm + LeakyReLU 0.2): layer 1 at full
    resolution; layers 2, 3, 4 each downsample by a stride-2 convolution (to
    1/2, 1/4, 1/8); layers 5, 6, 7 each upsample by 2 (linear) before their
    conv (back to 1/4, 1/2, 1); then a linear 1-filter conv reconstructs the
    image. The paper gives the filters and the number of samplings, not where
    the samplings sit; this placement is ours.

    ``__call__(x)`` returns ``(reconstruction, layers)``: ``(B, *spatial, 1)``
    and the list of the first ``num_feature_layers`` (6, Sec. 4) post-block
    feature maps, ``layers[k]`` ``(B, *spatial / 2**s_k, features[k])`` with
    ``s = (0, 1, 2, 3, 2, 1)``.

    Raises:
      ValueError: an input of the wrong rank or channels, or a spatial size not divisible by 8.
    """

    def __init__(self, ndim: int, in_channels: int = 1, *, features=CONTRAREG_AE_FEATURES,
                 num_feature_layers: int = 6, rngs: nnx.Rngs):
        features = tuple(int(f) for f in features)
        if len(features) != 7:
            raise ValueError(f"the ContraReg autoencoder has 7 blocks, got features {features}")
        if not 1 <= num_feature_layers <= 7:
            raise ValueError(f"num_feature_layers must be in [1, 7], got {num_feature_layers}")
        self.ndim, self.in_channels, self.num_feature_layers = ndim, in_channels, num_feature_layers
        self.features = features
        strides = (1, 2, 2, 2, 1, 1, 1)
        blocks, c = [], in_channels
        for f, s in zip(features, strides):
            blocks.append(ConvBlock(ndim, c, f, stride=s, norm=True, rngs=rngs))
            c = f
        self.blocks = nnx.List(blocks)
        self.out = nnx.Conv(c, in_channels, (3,) * ndim, padding="SAME", conv_general_dilated=conv_general_dilated,
                            rngs=rngs)
        self.scales = (0, 1, 2, 3, 2, 1, 0)

    def _run(self, x, blocks: int):
        _check(x, self.ndim, self.in_channels, 8, "ContraRegAutoencoder")
        shape = x.shape[1:-1]
        layers = []
        for i, block in enumerate(self.blocks[:blocks]):
            if i >= 4:
                x = _resize(x, tuple(s // 2 ** self.scales[i] for s in shape))
            x = block(x)
            layers.append(x)
        return x, layers

    def __call__(self, x: Float[Array, "B *spatial C"]):
        x, layers = self._run(x, len(self.blocks))
        return self.out(x), layers[: self.num_feature_layers]

    def encode(self, x: Float[Array, "B *spatial C"]) -> list:
        """Only the ``num_feature_layers`` feature maps (the later blocks and the output conv are not run)."""
        return self._run(x, self.num_feature_layers)[1]

    @property
    def layer_features(self) -> tuple:
        """Channels of the returned feature layers."""
        return self.features[: self.num_feature_layers]


class _Stage(nnx.Module):
    """DeepSim stage: normalisation, two 3x3(x3) convs with LeakyReLU, dropout (Sec. 4)."""

    def __init__(self, ndim, cin, cout, *, dropout, rngs):
        self.norm = nnx.GroupNorm(cin, num_groups=cin, epsilon=1e-5, rngs=rngs)
        conv = lambda a, b: nnx.Conv(a, b, (3,) * ndim, padding="SAME",  # noqa: E731
                                     conv_general_dilated=conv_general_dilated, rngs=rngs)
        self.conv1, self.conv2 = conv(cin, cout), conv(cout, cout)
        self.dropout = float(dropout)

    def __call__(self, x, key=None):
        x = jax.nn.leaky_relu(self.conv1(self.norm(x)), LEAKY_SLOPE)
        x = jax.nn.leaky_relu(self.conv2(x), LEAKY_SLOPE)
        if key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0.0)
        return x


class DeepSimNet(nnx.Module):
    """DeepSim's feature extractor with an auto-encoder or a segmentation head (Sec. 3 and 4).

    Encoder: three stages of widths ``features`` (2D 64-128-256, 3D
    32-64-128), each (norm, conv, LeakyReLU, conv, LeakyReLU, dropout),
    followed by 2x max pooling except the last; decoder: two upsampling
    stages back to full resolution (widths ``features[1]``, ``features[0]``,
    with U-Net skip connections for ``head="seg"`` and none for the
    auto-encoder, as the paper), three smoothing 3x3(x3) convs (LeakyReLU)
    and a 1x1 head: ``sigmoid`` (``head="ae"``: always ``in_channels``
    outputs, reconstructing the image; ``out_channels`` is not used) or
    ``out_channels`` class logits (``head="seg"``, softmax in the loss).

    Normalisation: the paper's batch norm is replaced by instance
    normalisation (per image and channel, learned scale and shift): the
    paper's 3D models ran batch-size-1 passes (Sec. 4, gradients summed over
    passes), where batch norm's training statistics are exactly these, and it
    keeps the frozen extractor a function of one image (no running
    statistics, the same features in training and inference).

    ``__call__(x, key=None)`` returns ``(output, layers)``: the head output
    ``(B, *spatial, out_channels)`` and the three encoder stage outputs
    ``layers[l]`` ``(B, *spatial / 2**l, features[l])`` (the DeepSim
    features, eq. 5). Dropout (rate ``dropout``, ours: the paper does not
    state it) is applied only when a PRNG ``key`` is given (pretraining).

    Raises:
      ValueError: unknown head, or an input of the wrong rank/channels or a size not divisible by 4.
    """

    def __init__(self, ndim: int, in_channels: int = 1, *, features=None, head: str = "ae",
                 out_channels: int | None = None, dropout: float = 0.2, rngs: nnx.Rngs):
        if head not in ("ae", "seg"):
            raise ValueError(f"head must be 'ae' or 'seg', got {head!r}")
        features = tuple(int(f) for f in (features or (DEEPSIM_FEATURES_2D if ndim == 2 else DEEPSIM_FEATURES_3D)))
        if len(features) != 3:
            raise ValueError(f"DeepSim has three encoder stages, got features {features}")
        if head == "seg" and not out_channels:
            raise ValueError("head='seg' needs out_channels (the number of classes, background included)")
        self.ndim, self.in_channels, self.head, self.features = ndim, in_channels, head, features
        self.out_channels = int(out_channels) if head == "seg" else in_channels  # ae reconstructs its input
        enc, c = [], in_channels
        for f in features:
            enc.append(_Stage(ndim, c, f, dropout=dropout, rngs=rngs))
            c = f
        dec = []
        for f, skip in zip(features[1::-1], features[1::-1]):
            dec.append(_Stage(ndim, c + (skip if head == "seg" else 0), f, dropout=dropout, rngs=rngs))
            c = f
        self.enc, self.dec = nnx.List(enc), nnx.List(dec)
        self.smooth = nnx.List([ConvBlock(ndim, c, c, rngs=rngs) for _ in range(3)])
        self.out = nnx.Conv(c, self.out_channels, (1,) * ndim, conv_general_dilated=conv_general_dilated, rngs=rngs)

    def encode(self, x: Float[Array, "B *spatial C"], key=None) -> list:
        """The three encoder stage outputs (DeepSim's feature layers ``F^l``)."""
        _check(x, self.ndim, self.in_channels, 4, "DeepSimNet")
        keys = list(jax.random.split(key, 3)) if key is not None else [None] * 3
        layers = []
        for i, stage in enumerate(self.enc):
            if i > 0:
                x = max_pool(x, self.ndim)
            x = stage(x, keys[i])
            layers.append(x)
        return layers

    def __call__(self, x: Float[Array, "B *spatial C"], key=None):
        keys = list(jax.random.split(key, 3)) if key is not None else [None] * 3
        layers = self.encode(x, keys[0])
        h = layers[-1]
        dkeys = list(jax.random.split(keys[1], 2)) if key is not None else [None] * 2
        for i, stage in enumerate(self.dec):
            skip = layers[-2 - i]
            h = _resize(h, skip.shape[1:-1])
            h = stage(concat(h, skip) if self.head == "seg" else h, dkeys[i])
        for block in self.smooth:
            h = block(h)
        out = self.out(h)
        return (jax.nn.sigmoid(out) if self.head == "ae" else out), layers
