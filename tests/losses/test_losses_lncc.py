"""LNCC against a brute-force NumPy oracle, and its invariances."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg.losses import lncc


def lncc_reference(f, m, w, window, eps=1e-5):
    """Loop over voxels; window clipped to the image, weighted by the mask."""
    f, m, w = (np.asarray(a, np.float64) for a in (f, m, w))
    spatial = f.shape[:-1]
    axes = tuple(range(len(spatial)))
    r = window // 2
    cc = np.zeros(f.shape)
    for idx in np.ndindex(spatial):
        sl = tuple(slice(max(i - r, 0), i + r + 1) for i in idx)
        ww, ff, mm = w[sl][..., None], f[sl], m[sl]
        n = ww.sum(axes)
        if not np.all(n > 0):
            continue
        s_f, s_m = (ww * ff).sum(axes), (ww * mm).sum(axes)
        cross = (ww * ff * mm).sum(axes) - s_f * s_m / n
        var_f = (ww * ff * ff).sum(axes) - s_f**2 / n
        var_m = (ww * mm * mm).sum(axes) - s_m**2 / n
        cc[idx] = cross**2 / (var_f * var_m + eps)
    return -np.sum(w * cc.mean(-1)) / np.sum(w)


def test_matches_bruteforce_oracle_with_mask(spatial, make_image, evaluator):
    f, m = make_image(0, spatial), make_image(1, spatial, sigma=2.5)
    w = np.ones(spatial, np.float32)
    w[: spatial[0] // 3] = 0.0
    w[-2:] = 0.5
    values = evaluator(lncc).values([(f, m), (f, m, w)])
    expected = [lncc_reference(f, m, np.ones(spatial), 9), lncc_reference(f, m, w, 9)]
    np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-6)


def test_affine_intensity_invariance_symmetry_and_range(spatial, make_image, evaluator):
    f, m = make_image(0, spatial), make_image(1, spatial, sigma=2.5)
    values = evaluator(lncc).values([
        (f, m), (f, 2.5 * m + 3.0), (f, -0.7 * m + 0.2), (4.0 * f - 1.0, m), (m, f),
        (f, 3.0 * f + 1.0), (f, -f),
    ])
    np.testing.assert_allclose(values[1:5], values[0], rtol=1e-4)
    np.testing.assert_allclose(values[5:], -1.0, atol=1e-4)
    assert -1.0 <= values[0] <= 0.0
    assert values[0] > -0.9  # different images are not perfectly correlated


def test_constant_image_gives_zero(spatial, make_image, evaluator):
    f = make_image(0, spatial)
    zero = np.zeros_like(f)
    values = evaluator(lncc).values([(f, np.full_like(f, 0.3)), (zero, zero)])
    np.testing.assert_allclose(values, 0.0, atol=1e-7)


def test_window_is_static_and_checked(make_image):
    f, m = make_image(0, (16, 12)), make_image(1, (16, 12), sigma=2.5)
    jitted = jax.jit(lncc, static_argnames=("window",))
    np.testing.assert_allclose(
        float(jitted(f, m, window=5)), lncc_reference(f, m, np.ones((16, 12)), 5), rtol=1e-4
    )
    for bad in (4, 0, 3.0, True):
        with pytest.raises(ValueError, match="window"):
            lncc(jnp.asarray(f), jnp.asarray(m), window=bad)


def test_channels_are_averaged(make_image):
    spatial = (16, 12)
    f = np.concatenate([make_image(0, spatial), make_image(1, spatial)], -1)
    m = np.concatenate([make_image(2, spatial), make_image(1, spatial)], -1)
    per_channel = [
        lncc_reference(f[..., c : c + 1], m[..., c : c + 1], np.ones(spatial), 5) for c in range(2)
    ]
    value = float(jax.jit(functools.partial(lncc, window=5))(f, m))
    np.testing.assert_allclose(value, np.mean(per_channel), rtol=1e-4)
    # identical channel: -1 up to eps, which matters for 5x5 windows on a smooth image
    np.testing.assert_allclose(per_channel[1], -1.0, atol=5e-3)
