"""KeyMorph keypoint detector and centre-of-mass layer (Flax NNX, 2D/3D).

Source: Wang, Yu, Dalca, Sabuncu, "A robust and interpretable deep learning
framework for multi-modal registration via keypoints" (KeyMorph), MedIA 2023,
Sec. 4.1 and Fig. 2: convolutions with instance normalisation and ReLU, 2x
downsampling by strided convolution, N output activation maps, and a
centre-of-mass (CoM) layer (Ma et al. 2020; Sofka et al. 2017) that turns
each map into one point, approximately translation-equivariant.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from jaxreg.nn.conv import conv_general_dilated

KEYMORPH_WIDTHS = (32, 64, 128, 256)  # ours at CPU scale; the paper's Fig. 2 backbone widths differ by model size


def center_of_mass_points(maps: Float[Array, "B *spatial N"], input_shape) -> Float[Array, "B N D"]:
    """Centre of mass of each non-negative activation map, in voxel coordinates of the *input* grid.

    A map on a grid downsampled by ``s = input / map`` per axis places its
    voxel ``i`` at input coordinate ``(i + 0.5) s - 0.5`` (voxel centres
    aligned, as :func:`jaxreg.spatial.resize_disp`). A map that is zero
    everywhere gives the grid centre (no NaN).

    Args:
      maps: ``(B, *spatial, N)`` activations (negative values are clipped to 0).
      input_shape: spatial shape of the network input.

    Returns:
      ``(B, N, D)`` float32 keypoints ``(N, D)`` per example, voxel units.
    """
    spatial = maps.shape[1:-1]
    d = len(spatial)
    w = jnp.maximum(maps.astype(jnp.float32), 0.0)
    total = jnp.sum(w, axis=tuple(range(1, d + 1)))  # (B, N)
    coords = []
    for ax, (n, big) in enumerate(zip(spatial, input_shape)):
        s = big / n
        c = (jnp.arange(n, dtype=jnp.float32) + 0.5) * s - 0.5
        marg = jnp.sum(w, axis=tuple(a + 1 for a in range(d) if a != ax))  # (B, n, N)
        num = jnp.einsum("bin,i->bn", marg, c)
        centre = (big - 1) / 2.0
        coords.append(jnp.where(total > 0, num / jnp.where(total > 0, total, 1.0), centre))
    return jnp.stack(coords, axis=-1)


def strided_conv(conv: nnx.Conv, x, stride: int):
    """``conv`` (stride 1, "SAME", odd kernel) applied with ``stride``: exactly a strided "SAME" convolution.

    On CPU it is the stride-1 convolution (the fast path of
    :func:`jaxreg.nn.conv.conv3d`) sampled at the strided output centres: the
    gradient of XLA's strided 3D convolution took 17.5 s for four 64^3 inputs
    of the KeyMorph detector on 2 cores, against ~1.5 s this way. Elsewhere
    it is XLA's strided convolution (cuDNN on GPUs).
    """
    d = x.ndim - 2
    kernel = conv.kernel[...]
    if jax.default_backend() != "cpu":
        dn = ("NHWC", "HWIO", "NHWC") if d == 2 else ("NDHWC", "DHWIO", "NDHWC")
        y = jax.lax.conv_general_dilated(x, kernel, (stride,) * d, "SAME", dimension_numbers=dn)
        return y + conv.bias[...] if conv.bias is not None else y
    y = conv(x)
    sl = [slice(None)]
    for n, k in zip(x.shape[1:-1], kernel.shape[:d]):
        out = -(-n // stride)
        pad_lo = max((out - 1) * stride + k - n, 0) // 2
        sl.append(slice(k // 2 - pad_lo, None, stride))
    return y[tuple(sl)]


class KeypointDetector(nnx.Module):
    """CNN + CoM: image ``(B, *spatial, C)`` -> keypoints ``(B, N, D)`` in voxel coordinates of the input.

    Each stage is conv 3^d + instance norm + ReLU, then a stride-2 conv 3^d +
    instance norm + ReLU (downsampling); a final conv 3^d + instance norm +
    ReLU gives ``N`` maps whose centres of mass are the keypoints. The
    normalised head is the official implementation's last block (a 1x1 conv
    + ReLU without it left every map broadly positive: the keypoints stayed
    at the grid centre through 280 pretraining steps, loss 230 voxel^2 =
    the all-at-the-centre value).

    Args:
      ndim: 2 or 3.
      in_channels: image channels.
      num_keypoints: ``N`` (KeyMorph Sec. 5: 128).
      widths: channels per stage.
      downsample: per stage, whether its second conv has stride 2 (default:
        every stage downsamples); stages that do not keep the resolution and
        only widen the receptive field.

    Raises:
      ValueError: on an input of the wrong rank or channels, or ``downsample``
        of the wrong length.
    """

    def __init__(self, ndim: int, in_channels: int = 1, *, num_keypoints: int = 128, widths=KEYMORPH_WIDTHS,
                 downsample=None, rngs: nnx.Rngs):
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        downsample = (True,) * len(widths) if downsample is None else tuple(bool(b) for b in downsample)
        if len(downsample) != len(widths):
            raise ValueError(f"downsample needs one entry per stage ({len(widths)}), got {len(downsample)}")
        self.ndim, self.in_channels, self.num_keypoints = ndim, in_channels, num_keypoints
        k = (3,) * ndim
        convs, norms, c = [], [], in_channels
        strides = []
        for f, down in zip(widths, downsample):
            for stride in (1, 2 if down else 1):
                convs.append(nnx.Conv(c, f, k, strides=1, padding="SAME",
                                      conv_general_dilated=conv_general_dilated, rngs=rngs))
                strides.append(stride)
                norms.append(nnx.GroupNorm(f, num_groups=f, use_bias=False, use_scale=False, epsilon=1e-5,
                                           rngs=rngs))
                c = f
        self.convs, self.norms, self.strides = nnx.List(convs), nnx.List(norms), tuple(strides)
        self.head = nnx.Conv(c, num_keypoints, k, padding="SAME", conv_general_dilated=conv_general_dilated,
                             rngs=rngs)
        self.head_norm = nnx.GroupNorm(num_keypoints, num_groups=num_keypoints, use_bias=False, use_scale=False,
                                       epsilon=1e-5, rngs=rngs)

    def maps(self, x: Float[Array, "B *spatial C"]) -> Float[Array, "B *coarse N"]:
        """The ReLU-clipped activation maps before the CoM layer."""
        if x.ndim != self.ndim + 2 or x.shape[-1] != self.in_channels:
            raise ValueError(f"KeypointDetector expects (B, *spatial[{self.ndim}], {self.in_channels}), got {x.shape}")
        for conv, norm, stride in zip(self.convs, self.norms, self.strides):
            x = jax.nn.relu(norm(conv(x) if stride == 1 else strided_conv(conv, x, stride)))
        return jax.nn.relu(self.head_norm(self.head(x)))

    def __call__(self, x: Float[Array, "B *spatial C"]) -> Float[Array, "B N D"]:
        return center_of_mass_points(self.maps(x), x.shape[1:-1])
