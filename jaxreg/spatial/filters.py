"""Separable Gaussian smoothing of images and fields."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

# Axis lengths up to this many kernel widths are blurred by a dense (n, n)
# matrix product (one GEMM, whose transpose is a GEMM too); longer axes by a
# weighted sum of shifted slices with a hand-written adjoint. Measured on 2
# CPU cores (forward + backward, float32): a 30x30x20x3 field at sigma 2
# 3.7 -> 1.0 ms, 60x60x39x3 61 -> 7.9 ms; forward only at 120x120x78,
# sigma 1 (7 taps), slices 9.8 ms vs matmul 16.6 ms, hence the threshold.
_MATMUL_TAPS_RATIO = 8


@functools.lru_cache(maxsize=None)
def _kernel(sigma: float) -> tuple[int, tuple[float, ...]]:
    r = int(np.ceil(2.5 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return r, tuple(float(v) for v in (k / k.sum()).astype(np.float32))


@functools.lru_cache(maxsize=None)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """``(n, n)`` matrix of the 1D blur with replicated borders: ``y = M @ x``."""
    r, k = _kernel(sigma)
    m = np.zeros((n, n), np.float64)
    rows = np.arange(n)
    for t, w in enumerate(k):
        np.add.at(m, (rows, np.clip(rows + t - r, 0, n - 1)), w)
    return m.astype(np.float32)


def _shifted_sum(x, k, n, axis):
    """``sum_t k[t] x[t : t + n]`` along ``axis``."""
    return sum(k[t] * jax.lax.slice_in_dim(x, t, t + n, axis=axis) for t in range(len(k)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _slice_blur(x, axis, sigma):
    r, k = _kernel(sigma)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    return _shifted_sum(jnp.pad(x, pad, mode="edge"), k, x.shape[axis], axis)


def _slice_blur_fwd(x, axis, sigma):
    return _slice_blur(x, axis, sigma), x.shape[axis]


def _slice_blur_bwd(axis, sigma, n, g):
    # Adjoint of (edge pad, then correlate): correlate the zero-padded
    # cotangent (the kernel is symmetric) and fold the padded ends back onto
    # the first and last samples. XLA's autodiff of the slices (one pad of
    # the whole array per tap) was 10-20x slower than the forward pass.
    r, k = _kernel(sigma)
    pad = [(0, 0)] * g.ndim
    pad[axis] = (2 * r, 2 * r)
    full = _shifted_sum(jnp.pad(g, pad), k, n + 2 * r, axis)  # adjoint w.r.t. the padded input
    core = jax.lax.slice_in_dim(full, r, r + n, axis=axis)
    if r == 0:
        return (core,)
    left = jnp.sum(jax.lax.slice_in_dim(full, 0, r, axis=axis), axis=axis, keepdims=True)
    right = jnp.sum(jax.lax.slice_in_dim(full, n + r, n + 2 * r, axis=axis), axis=axis, keepdims=True)
    ends = [(0, 0)] * g.ndim
    ends[axis] = (0, n - 1)
    out = core + jnp.pad(left, ends)
    ends[axis] = (n - 1, 0)
    return (out + jnp.pad(right, ends),)


_slice_blur.defvjp(_slice_blur_fwd, _slice_blur_bwd)


def gaussian_blur(image, sigma):
    """Separable Gaussian blur of ``(*spatial, C)`` (border replicated, radius ``ceil(2.5 sigma)``).

    ``sigma`` is a Python float in voxels (``<= 0``: the image unchanged);
    returns an array of the input's shape and dtype. The kernel is sampled at
    integer offsets and normalised to sum to 1, so constants are preserved.

    Short axes (up to 8 kernel widths, e.g. control-grid fields) are blurred
    by an ``(n, n)`` matrix product at float32 precision; longer axes by
    shifted-slice sums with a hand-written adjoint. Both compute the same
    operator (to float rounding) and are differentiable.
    """
    if sigma <= 0:
        return image
    sigma = float(sigma)
    r, _ = _kernel(sigma)
    for ax in range(image.ndim - 1):
        n = image.shape[ax]
        if n <= _MATMUL_TAPS_RATIO * (2 * r + 1):
            m = jnp.asarray(_blur_matrix(n, sigma), image.dtype)
            out = jnp.tensordot(m, image, axes=([1], [ax]), precision=jax.lax.Precision.HIGHEST)
            image = jnp.moveaxis(out, 0, ax)
        else:
            image = _slice_blur(image, ax, sigma)
    return image
