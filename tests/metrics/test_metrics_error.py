"""Endpoint error and TRE in mm: constant offsets, linear fields, masks, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg.metrics import endpoint_error, endpoint_error_stats, tre

CASES = [(2, (10, 12), (0.5, 2.0)), (3, (6, 7, 5), (1.0, 0.8, 2.5))]


@pytest.mark.parametrize("ndim, shape, spacing", CASES)
def test_constant_offset_error_is_offset_in_mm(ndim, shape, spacing):
    rng = np.random.default_rng(ndim)
    true = jnp.asarray(rng.standard_normal((*shape, ndim)), jnp.float32)
    offset = np.array([1.5, -2.0, 0.5][:ndim])
    est = true + jnp.asarray(offset, jnp.float32)
    expected = np.linalg.norm(offset * np.asarray(spacing))
    err = endpoint_error(est, true, spacing=spacing)
    assert err.shape == shape and err.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(err), expected, rtol=1e-5)
    stats = endpoint_error_stats(est, true, spacing=spacing)
    assert set(stats) == {"mean", "median", "p95", "max"}
    for v in stats.values():
        assert isinstance(v, float) and v == pytest.approx(expected, rel=1e-5)


def test_mask_sets_nan_outside_and_stats_use_masked_voxels():
    shape = (8, 10)
    true = jnp.zeros((*shape, 2), jnp.float32)
    ramp = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    est = jnp.stack([jnp.asarray(ramp), jnp.zeros(shape)], axis=-1)  # error = ramp * 2 mm
    mask = np.zeros(shape, bool)
    mask[2:5, 3:9] = True
    err = np.asarray(endpoint_error(est, true, spacing=(2.0, 1.0), mask=jnp.asarray(mask)))
    assert np.all(np.isnan(err[~mask]))
    np.testing.assert_allclose(err[mask], 2 * ramp[mask], rtol=1e-6)
    stats = endpoint_error_stats(est, true, spacing=(2.0, 1.0), mask=mask)
    vals = 2.0 * ramp[mask]
    assert stats["mean"] == pytest.approx(vals.mean(), rel=1e-6)
    assert stats["median"] == pytest.approx(np.median(vals), rel=1e-6)
    assert stats["p95"] == pytest.approx(np.percentile(vals, 95), rel=1e-6)
    assert stats["max"] == pytest.approx(vals.max(), rel=1e-6)


def test_endpoint_error_jit_traced_spacing_and_finite_grad_at_zero():
    true = jnp.ones((5, 6, 4, 3), jnp.float32)
    traces = 0

    def f(e, t, s):
        nonlocal traces
        traces += 1
        return endpoint_error(e, t, spacing=s)

    jf = jax.jit(f)
    out = jf(true + 1.0, true, jnp.array([1.0, 2.0, 2.0]))
    jf(true + 2.0, true, jnp.array([3.0, 2.0, 1.0]))
    assert traces == 1
    np.testing.assert_allclose(np.asarray(out), 3.0, rtol=1e-6)
    g = jax.grad(lambda e: endpoint_error(e, true, spacing=(1.0, 1.0, 1.0)).sum())(true)
    np.testing.assert_array_equal(np.asarray(g), 0.0)


@pytest.mark.parametrize("ndim, shape, spacing", CASES)
def test_tre_linear_field_exact_at_fractional_points(ndim, shape, spacing):
    rng = np.random.default_rng(20 + ndim)
    a = np.eye(ndim) + 0.1 * rng.standard_normal((ndim, ndim))
    t = rng.uniform(-2, 2, ndim)
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    disp = jnp.asarray(x @ (a - np.eye(ndim)).T + t, jnp.float32)
    pf = rng.uniform(0, np.asarray(shape) - 1, size=(13, ndim))  # inside the grid
    pm = pf @ a.T + t  # phi(p_f): linear interpolation reproduces a linear field exactly
    np.testing.assert_allclose(np.asarray(tre(pf, pm, disp, spacing=spacing)), 0.0, atol=1e-4)
    err = rng.standard_normal((13, ndim))
    expected = np.linalg.norm(err * np.asarray(spacing), axis=-1)
    out = jax.jit(lambda p, q, u: tre(p, q, u, spacing=spacing))(pf, pm - err, disp)
    assert out.shape == (13,)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)


def test_tre_outside_points_take_border_value():
    shape = (6, 6)
    disp = jnp.zeros((*shape, 2), jnp.float32).at[..., 0].set(jnp.arange(6.0)[:, None])  # u_0 = x_0
    pf = np.array([[9.0, 2.0], [-3.0, 2.0]])  # beyond the last / first row: u_0 = 5 / 0
    pm = np.array([[9.0 + 5.0, 2.0], [-3.0, 2.0]])
    np.testing.assert_allclose(np.asarray(tre(pf, pm, disp, spacing=(1.0, 1.0))), 0.0, atol=1e-6)


def test_error_cases():
    d2 = jnp.zeros((4, 5, 2), jnp.float32)
    with pytest.raises(ValueError, match=r"\(4, 5, 2\) vs \(4, 4, 2\)"):
        endpoint_error(d2, jnp.zeros((4, 4, 2)), spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"shape \(2,\), got \(3,\)"):
        endpoint_error(d2, d2, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        endpoint_error(d2, d2, spacing=(1.0, 0.0))
    with pytest.raises(ValueError, match=r"mask shape \(4, 4\)"):
        endpoint_error(d2, d2, spacing=(1.0, 1.0), mask=np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="selects no voxel"):
        endpoint_error_stats(d2, d2, spacing=(1.0, 1.0), mask=np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="NaN/Inf"):
        endpoint_error_stats(d2.at[0, 0, 0].set(jnp.nan), d2, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"\(N, 2\).*\(3, 2\) and \(4, 2\)"):
        tre(np.zeros((3, 2)), np.zeros((4, 2)), d2, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"\(N, 2\).*\(3, 3\)"):
        tre(np.zeros((3, 3)), np.zeros((3, 3)), d2, spacing=(1.0, 1.0))
