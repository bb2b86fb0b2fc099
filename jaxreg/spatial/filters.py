"""Separable Gaussian smoothing of images and fields."""
import jax
import jax.numpy as jnp
import numpy as np


def gaussian_blur(image, sigma):
    """Separable Gaussian blur of ``(*spatial, C)`` (border replicated, radius ``ceil(2.5 sigma)``).

    ``sigma`` is a Python float in voxels (``<= 0``: the image unchanged);
    returns an array of the input's shape and dtype.

    Each axis is a weighted sum of shifted slices: a handful of fused
    multiply-adds per voxel, much faster on CPU than a vmapped 1D convolution.
    """
    if sigma <= 0:
        return image
    r = int(np.ceil(2.5 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    for ax in range(image.ndim - 1):
        n = image.shape[ax]
        pad = [(0, 0)] * image.ndim
        pad[ax] = (r, r)
        x = jnp.pad(image, pad, mode="edge")
        image = sum(float(k[i]) * jax.lax.slice_in_dim(x, i, i + n, axis=ax) for i in range(2 * r + 1))
    return image
