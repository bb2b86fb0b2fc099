"""RC contrast augmentation (CAR Sec. 2.1): keyed, pointwise for 1x1 kernels, changes contrast, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxreg.augment import random_convolution


def _image(shape=(24, 20), seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    img = np.clip(1.2 - np.hypot(yy, xx), 0, 1) * (0.6 + 0.4 * np.sin(6 * xx)) + 0.05 * rng.random(shape)
    return jnp.asarray(img[..., None], jnp.float32)


def test_deterministic_for_a_key_and_in_unit_range():
    x = _image()
    a, b = random_convolution(jax.random.key(3), x), random_convolution(jax.random.key(3), x)
    c = random_convolution(jax.random.key(4), x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert a.shape == x.shape and a.dtype == jnp.float32
    assert float(a.min()) == pytest.approx(0.0, abs=1e-6) and float(a.max()) == pytest.approx(1.0, abs=1e-6)
    jitted = jax.jit(lambda k, im: random_convolution(k, im))(jax.random.key(3), x)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(a), atol=1e-5)


@pytest.mark.parametrize("shape", [(24, 20), (10, 12, 8)])
def test_one_by_one_kernels_are_pointwise_so_they_commute_with_warps(shape):
    x = _image(shape[:2]) if len(shape) == 2 else jnp.asarray(np.random.default_rng(1).random((*shape, 1)), jnp.float32)
    key = jax.random.key(7)
    y = random_convolution(key, x)
    # any voxel permutation (a warp onto voxel centres, e.g. a circular shift) commutes exactly
    perm = lambda a: jnp.roll(jnp.flip(a, 0), 3, axis=1)  # noqa: E731
    np.testing.assert_allclose(np.asarray(random_convolution(key, perm(x))), np.asarray(perm(y)), atol=1e-6)
    # equal input values give equal outputs: y is a function of x alone
    flat_x, flat_y = np.asarray(x).ravel(), np.asarray(y).ravel()
    order = np.argsort(flat_x)
    rebuilt = np.interp(flat_x, flat_x[order], flat_y[order])
    np.testing.assert_allclose(rebuilt, flat_y, atol=1e-5)


def test_contrast_really_changes_for_some_keys():
    x = _image()
    rhos = [stats.spearmanr(np.asarray(x).ravel(), np.asarray(random_convolution(jax.random.key(k), x)).ravel())[0]
            for k in range(20)]
    assert min(rhos) < 0.3  # some contrasts invert or scramble the intensity order
    assert np.mean(np.abs(rhos)) < 0.95


def test_rc3_kernels_mix_neighbours():
    x = jnp.zeros((15, 15, 1)).at[7, 7, 0].set(1.0)
    y1 = np.asarray(random_convolution(jax.random.key(0), x))[..., 0]
    y3 = np.asarray(random_convolution(jax.random.key(0), x, kernel_size=3))[..., 0]
    far = y3[0, 0]
    assert np.unique(np.round(y1, 4)).size <= 2  # pointwise: the spike and the background only
    assert np.abs(y3[6:9, 6:9] - far).max() > 1e-3 and np.unique(np.round(y3, 4)).size > 2


def test_layers_option_and_errors():
    x = _image()
    assert random_convolution(jax.random.key(0), x, layers=1).shape == x.shape
    for kw, msg in ((dict(layers=0), "layers"), (dict(kernel_size=2), "kernel_size"), (dict(channels=0), "channels")):
        with pytest.raises(ValueError, match=msg):
            random_convolution(jax.random.key(0), x, **kw)


def test_constant_image_gives_zeros():
    y = random_convolution(jax.random.key(0), jnp.full((8, 8, 1), 0.3))
    np.testing.assert_array_equal(np.asarray(y), 0.0)
