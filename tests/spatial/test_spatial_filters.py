"""gaussian_blur: scipy oracle on both code paths (matrix and shifted slices), exact adjoint, constants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from jax.test_util import check_grads

from jaxreg.spatial import filters
from jaxreg.spatial import gaussian_blur


def _scipy_blur(x, sigma):
    # Same kernel: exp(-x^2 / 2 sigma^2) on integer offsets |x| <= ceil(2.5 sigma), normalised, edge replicated.
    return ndi.gaussian_filter(x.astype(np.float64), sigma=[sigma] * (x.ndim - 1) + [0], mode="nearest",
                               truncate=np.ceil(2.5 * sigma) / sigma)


# (70, 9) at sigma 1: axis 0 (70 > 8 * 7 taps) takes the slice path, axis 1 the matrix path.
@pytest.mark.parametrize("shape,sigma", [((70, 9, 2), 1.0), ((12, 10, 7, 3), 2.0), ((40, 5, 6, 1), 0.6)])
def test_matches_scipy(shape, sigma):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    np.testing.assert_allclose(np.asarray(gaussian_blur(jnp.asarray(x), sigma)), _scipy_blur(x, sigma),
                               atol=2e-6, rtol=1e-5)


def test_both_paths_taken():
    r, _ = filters._kernel(1.0)
    assert 70 > filters._MATMUL_TAPS_RATIO * (2 * r + 1) >= 9


@pytest.mark.parametrize("n,sigma", [(70, 1.0), (9, 1.0), (1, 1.0), (3, 2.0)])
def test_adjoint_is_matrix_transpose(n, sigma):
    """The VJP (hand-written for the slice path) equals M^T g for the blur matrix M."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(n, 4, 1)), jnp.float32)
    g = rng.normal(size=(n, 4, 1)).astype(np.float32)
    _, vjp = jax.vjp(lambda a: filters._slice_blur(a, 0, sigma), x)
    m = filters._blur_matrix(n, sigma).astype(np.float64)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), np.einsum("ij,iab->jab", m, g), atol=1e-5)
    np.testing.assert_allclose(np.asarray(filters._slice_blur(x, 0, sigma)),
                               np.einsum("ij,jab->iab", m, np.asarray(x, np.float64)), atol=1e-5)


def test_gradient_finite_differences():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(64, 6, 2)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(3).normal(size=(64, 6, 2)), jnp.float32)
    f = lambda a: jnp.sum(jnp.sin(gaussian_blur(a, 1.0)) * w)  # noqa: E731
    check_grads(f, (x,), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_constants_preserved_and_sigma_zero():
    c = jnp.full((80, 7, 5, 2), 3.5, jnp.float32)
    np.testing.assert_allclose(np.asarray(gaussian_blur(c, 1.5)), 3.5, rtol=1e-6)
    x = jnp.arange(12.0).reshape(3, 4, 1)
    assert gaussian_blur(x, 0.0) is x


@pytest.mark.parametrize("shape, factor, sigma", [
    ((16, 12, 8, 3), 2, 1.0),    # the pyramid's case (sigma = factor / 2)
    ((24, 12, 36, 2), 4, 2.0),   # even factor > 2: halfway between voxels 4i + 1 and 4i + 2
    ((9, 15, 6, 1), 3, 1.5),     # odd factor: on voxel 3i + 1
    ((32, 16, 2), 2, 0.5),       # 2D
])
def test_gaussian_downsample_equals_blur_then_resize(shape, factor, sigma):
    from jaxreg.spatial import gaussian_downsample

    x = jax.random.normal(jax.random.key(1), shape)
    out_shape = tuple(n // factor for n in shape[:-1]) + shape[-1:]
    ref = jax.image.resize(gaussian_blur(x, sigma), out_shape, "linear", antialias=False)
    out = gaussian_downsample(x, sigma, factor)
    assert out.shape == out_shape and out.dtype == x.dtype
    np.testing.assert_allclose(out, ref, atol=1e-6)
    # constants are preserved (replicated borders), and the gradient matches the two-step operator's
    np.testing.assert_allclose(gaussian_downsample(jnp.full(shape, 2.5), sigma, factor), 2.5, rtol=1e-6)
    w = jax.random.normal(jax.random.key(2), out_shape)
    g = jax.grad(lambda a: jnp.sum(w * gaussian_downsample(a, sigma, factor)))(x)
    g_ref = jax.grad(lambda a: jnp.sum(w * jax.image.resize(gaussian_blur(a, sigma), out_shape, "linear",
                                                            antialias=False)))(x)
    np.testing.assert_allclose(g, g_ref, atol=1e-5)


def test_gaussian_downsample_rejects_indivisible_shapes():
    from jaxreg.spatial import gaussian_downsample

    with pytest.raises(ValueError, match="multiple of factor 2"):
        gaussian_downsample(jnp.zeros((9, 8, 1)), 1.0, 2)
