"""Thin-plate splines: interpolation at lambda = 0, the affine limit, affine reproduction, gradients, chunking."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxreg.spatial import affine_to_disp, fit_affine, tps_disp, tps_kernel, tps_solve, tps_transform


def _points(n, d, seed=0, scale=40.0):
    return jax.random.uniform(jax.random.key(seed), (n, d)) * scale


@pytest.mark.parametrize("d", [2, 3])
def test_interpolates_control_points_at_lambda_zero(d):
    p = _points(20, d)
    q = p + 3.0 * jax.random.normal(jax.random.key(1), p.shape)
    tps = tps_solve(p, q, lam=0.0)
    np.testing.assert_allclose(np.asarray(tps_transform(tps, p)), np.asarray(q), atol=2e-3)
    # side conditions (eq. 6): sum W = 0 and sum W p = 0
    np.testing.assert_allclose(np.asarray(jnp.sum(tps.weights, 0)), 0.0, atol=1e-3)
    np.testing.assert_allclose(np.asarray(tps.control.T @ tps.weights), 0.0, atol=1e-3)


@pytest.mark.parametrize("d", [2, 3])
def test_large_lambda_tends_to_least_squares_affine(d):
    p = _points(30, d, seed=2)
    q = p @ (jnp.eye(d) * 1.1) + 2.0 + 2.0 * jax.random.normal(jax.random.key(3), p.shape)
    a = fit_affine(p, q)
    x = _points(50, d, seed=4)
    affine_x = x @ a[:d, :d].T + a[:d, d]
    errs = [float(jnp.max(jnp.abs(tps_transform(tps_solve(p, q, lam=lam), x) - affine_x)))
            for lam in (0.0, 1.0, 1e2, 1e5)]
    assert errs[0] > 0.5 and errs[-1] < 0.05
    assert errs == sorted(errs, reverse=True)


def test_affine_data_is_reproduced_everywhere_and_dense_disp():
    d = 3
    m = jnp.asarray([[1.05, 0.1, 0.0, 2.0], [-0.05, 0.95, 0.02, -1.0], [0.0, 0.03, 1.1, 0.5], [0, 0, 0, 1.0]])
    p = _points(12, d, seed=5, scale=10.0)
    q = p @ m[:d, :d].T + m[:d, d]
    tps = tps_solve(p, q)
    np.testing.assert_allclose(np.asarray(tps.weights), 0.0, atol=2e-3)
    shape = (9, 10, 8)
    np.testing.assert_allclose(np.asarray(tps_disp(tps, shape)), np.asarray(affine_to_disp(m, shape)), atol=5e-3)


def test_chunked_equals_unchunked():
    p = _points(16, 3, seed=6)
    tps = tps_solve(p, p + jax.random.normal(jax.random.key(7), p.shape), lam=0.1)
    full = tps_disp(tps, (11, 9, 7), chunk=0)
    for chunk in (1, 64, 100, 10_000):
        np.testing.assert_allclose(np.asarray(tps_disp(tps, (11, 9, 7), chunk=chunk)), np.asarray(full), atol=1e-4)
    f = jax.jit(lambda t: tps_disp(t, (11, 9, 7), chunk=64))
    np.testing.assert_allclose(np.asarray(f(tps)), np.asarray(full), atol=1e-4)


def test_gradients_through_the_solve():
    p = _points(8, 2, seed=8, scale=4.0)
    q = p + 0.5 * jax.random.normal(jax.random.key(9), p.shape)
    x = _points(5, 2, seed=10, scale=4.0)
    f = lambda p, q, lam: jnp.sum(jnp.sin(tps_transform(tps_solve(p, q, lam=lam), x)))
    check_grads(f, (p, q, 0.3), order=1, modes=["rev"], atol=5e-2, rtol=5e-2, eps=1e-2)
    g = jax.grad(lambda lam: f(p, q, lam))(0.0)
    assert np.isfinite(float(g))


def test_kernel_and_errors():
    np.testing.assert_allclose(float(tps_kernel(jnp.asarray(4.0))), 4.0 * np.log(2.0), rtol=1e-6)  # r = 2
    assert float(tps_kernel(jnp.asarray(0.0))) == 0.0
    assert float(jax.grad(tps_kernel)(jnp.asarray(0.0))) == 0.0
    with pytest.raises(ValueError, match="at least"):
        tps_solve(jnp.zeros((3, 3)), jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match="both be"):
        tps_solve(jnp.zeros((5, 3)), jnp.zeros((5, 2)))
    tps = tps_solve(_points(6, 2), _points(6, 2, seed=1))
    with pytest.raises(ValueError, match="points must be"):
        tps_transform(tps, jnp.zeros((4, 3)))
