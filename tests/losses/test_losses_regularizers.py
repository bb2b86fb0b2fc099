"""Regularisers against closed forms on constant, linear and quadratic fields."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg.losses import bending_energy, diffusion, velocity_l2


def _grid(spatial):
    return np.indices(spatial, dtype=np.float64)  # (D, *spatial)


def _linear_field(spatial, a, t):
    x = _grid(spatial)
    return (np.einsum("ij,j...->...i", a, x) + t).astype(np.float32)


def _quadratic_field(spatial, b):
    """u_i(x) = x^T B_i x / 2 with symmetric B_i, centred to keep values small."""
    x = _grid(spatial)
    x = x - x.reshape(len(spatial), -1).mean(1).reshape(-1, *([1] * len(spatial)))
    return (0.5 * np.einsum("ijk,j...,k...->...i", b, x, x)).astype(np.float32)


@pytest.fixture
def fields(dim, spatial):
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(dim, dim))
    t = rng.normal(size=dim)
    b = rng.normal(size=(dim, dim, dim))
    b = 0.1 * (b + b.transpose(0, 2, 1))  # symmetric Hessians
    return {
        "constant": np.broadcast_to(t.astype(np.float32), (*spatial, dim)),
        "linear": _linear_field(spatial, a, t),
        "quadratic": _quadratic_field(spatial, b),
        "a": a,
        "b": b,
    }


REGULARIZERS = {f.__name__: jax.jit(f) for f in (diffusion, bending_energy, velocity_l2)}


def test_diffusion(fields):
    reg = REGULARIZERS["diffusion"]
    assert float(reg(fields["constant"])) == 0.0
    np.testing.assert_allclose(float(reg(fields["linear"])), np.sum(fields["a"] ** 2), rtol=1e-4)


def test_bending_energy(fields):
    reg = REGULARIZERS["bending_energy"]
    assert float(reg(fields["constant"])) == 0.0
    np.testing.assert_allclose(float(reg(fields["linear"])), 0.0, atol=1e-6)
    # sum_i |B_i|_F^2 counts each mixed term twice, as the energy does
    np.testing.assert_allclose(float(reg(fields["quadratic"])), np.sum(fields["b"] ** 2), rtol=1e-3)


def test_velocity_l2(fields, spatial):
    reg = REGULARIZERS["velocity_l2"]
    t = fields["constant"][(0,) * len(spatial)]
    np.testing.assert_allclose(float(reg(fields["constant"])), np.sum(t**2), rtol=1e-4)
    v = fields["linear"]
    expected = np.mean(np.sum(v.astype(np.float64) ** 2, -1))
    np.testing.assert_allclose(float(reg(v)), expected, rtol=1e-4)


def test_gradients_finite_and_single_trace(fields):
    traces = []

    def total(u):
        traces.append(1)
        return diffusion(u) + bending_energy(u) + velocity_l2(u)

    grad = jax.jit(jax.grad(total))
    for key in ("constant", "linear", "quadratic"):
        assert np.all(np.isfinite(np.asarray(grad(fields[key])))), key
    assert len(traces) == 1


@pytest.mark.parametrize("fn", [diffusion, bending_energy, velocity_l2])
def test_bad_shapes_raise(fn):
    for shape in [(8, 8, 3), (8, 8), (8, 8, 8, 2), (4, 4, 4, 4, 4)]:
        with pytest.raises(ValueError, match="D = len"):
            fn(jnp.zeros(shape))


def test_bending_needs_three_voxels():
    with pytest.raises(ValueError, match="3 voxels"):
        bending_energy(jnp.zeros((8, 2, 2)))
