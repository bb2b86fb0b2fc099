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


class KeypointDetector(nnx.Module):
    """CNN + CoM: image ``(B, *spatial, C)`` -> keypoints ``(B, N, D)`` in voxel coordinates of the input.

    Each stage is conv 3^d + instance norm + ReLU, then a stride-2 conv 3^d +
    instance norm + ReLU (downsampling); a final 1x1 conv gives ``N`` maps,
    ReLU-clipped, whose centres of mass are the keypoints.

    Args:
      ndim: 2 or 3.
      in_channels: image channels.
      num_keypoints: ``N`` (KeyMorph Sec. 5: 128).
      widths: channels per stage (one downsampling per stage).

    Raises:
      ValueError: on an input of the wrong rank or channels.
    """

    def __init__(self, ndim: int, in_channels: int = 1, *, num_keypoints: int = 128, widths=KEYMORPH_WIDTHS,
                 rngs: nnx.Rngs):
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        self.ndim, self.in_channels, self.num_keypoints = ndim, in_channels, num_keypoints
        k = (3,) * ndim
        convs, norms, c = [], [], in_channels
        for f in widths:
            for stride in (1, 2):
                convs.append(nnx.Conv(c, f, k, strides=stride, padding="SAME",
                                      conv_general_dilated=conv_general_dilated, rngs=rngs))
                norms.append(nnx.GroupNorm(f, num_groups=f, use_bias=False, use_scale=False, epsilon=1e-5,
                                           rngs=rngs))
                c = f
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.head = nnx.Conv(c, num_keypoints, (1,) * ndim, rngs=rngs)

    def maps(self, x: Float[Array, "B *spatial C"]) -> Float[Array, "B *coarse N"]:
        """The ReLU-clipped activation maps before the CoM layer."""
        if x.ndim != self.ndim + 2 or x.shape[-1] != self.in_channels:
            raise ValueError(f"KeypointDetector expects (B, *spatial[{self.ndim}], {self.in_channels}), got {x.shape}")
        for conv, norm in zip(self.convs, self.norms):
            x = jax.nn.relu(norm(conv(x)))
        return jax.nn.relu(self.head(x))

    def __call__(self, x: Float[Array, "B *spatial C"]) -> Float[Array, "B N D"]:
        return center_of_mass_points(self.maps(x), x.shape[1:-1])
