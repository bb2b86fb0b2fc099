"""Bezier intensity curves (DNS Sec. 3.3): endpoints, monotonicity, inversion, determinism, jit, range."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import comb

from jaxreg.augment import bezier_control_points, bezier_curve, random_bezier


def test_control_points_are_monotone_with_fixed_endpoints():
    for seed in range(20):
        p = np.asarray(bezier_control_points(jax.random.key(seed), num_points=4))
        assert p.shape == (4, 2)
        np.testing.assert_array_equal(p[0], [0, 0])
        np.testing.assert_array_equal(p[-1], [1, 1])
        assert np.all(np.diff(p, axis=0) >= 0) and np.all((p >= 0) & (p <= 1))
    with pytest.raises(ValueError, match="num_points"):
        bezier_control_points(jax.random.key(0), num_points=1)


def test_curve_matches_bernstein_sum():
    p = np.asarray(bezier_control_points(jax.random.key(3)))
    t = np.linspace(0, 1, 11)
    n = len(p) - 1
    ref = sum(comb(n, i) * t[:, None] ** i * (1 - t[:, None]) ** (n - i) * p[i] for i in range(n + 1))
    np.testing.assert_allclose(np.asarray(bezier_curve(jnp.asarray(p), jnp.asarray(t))), ref, atol=1e-6)


def test_random_bezier_is_monotone_keyed_and_inverts():
    x = jnp.linspace(0, 1, 101).reshape(101, 1, 1)
    f = jax.jit(lambda k, im: random_bezier(k, im))
    increasing = decreasing = 0
    for seed in range(16):
        y = np.asarray(f(jax.random.key(seed), x))[:, 0, 0]
        assert np.all((y >= 0) & (y <= 1))
        d = np.diff(y)
        if np.all(d >= -1e-6):
            increasing += 1
            np.testing.assert_allclose([y[0], y[-1]], [0, 1], atol=1e-6)
        else:
            assert np.all(d <= 1e-6), "a Bezier map must be monotone"
            decreasing += 1
            np.testing.assert_allclose([y[0], y[-1]], [1, 0], atol=1e-6)
        np.testing.assert_array_equal(y, np.asarray(f(jax.random.key(seed), x))[:, 0, 0])
    assert increasing > 2 and decreasing > 2  # delta = 0.5: both happen
    never = np.asarray(random_bezier(jax.random.key(0), x, invert_prob=0.0))[:, 0, 0]
    assert np.all(np.diff(never) >= -1e-6)
    # a non-trivial curve: not the identity for most keys
    dev = [float(jnp.max(jnp.abs(random_bezier(jax.random.key(s), x, invert_prob=0.0) - x))) for s in range(8)]
    assert np.median(dev) > 0.05
