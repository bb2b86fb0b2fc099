"""Closed-form tests for jaxreg.spatial.integrate (scaling and squaring)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.test_util import check_grads
from scipy.ndimage import gaussian_filter

from jaxreg.spatial import compose, integrate, warp

SHAPES = {2: (24, 22), 3: (14, 13, 12)}
DIMS_3D_SLOW = [2, pytest.param(3, marks=pytest.mark.slow)]

_integrate = jax.jit(integrate, static_argnames="steps")
_compose = jax.jit(compose)


def _grid(shape):
    return np.stack(np.indices(shape), axis=-1).astype(np.float64)


def _interior(a, d, margin):
    return np.asarray(a)[(slice(margin, -margin),) * d]


def _jacobian_det(u):
    """det(I + grad u) by central differences (one-sided at the faces)."""
    d = u.shape[-1]
    jac = np.stack([np.stack(np.gradient(np.asarray(u, np.float64)[..., i]), -1) for i in range(d)], -2)
    return np.linalg.det(jac + np.eye(d))


def _smooth_field(shape, max_grad, rng, sigma=3.0):
    d = len(shape)
    u = np.stack([gaussian_filter(rng.standard_normal(shape), sigma, mode="nearest") for _ in range(d)], -1)
    jac = np.stack([np.stack(np.gradient(u[..., i]), -1) for i in range(d)], -2)
    u *= max_grad / np.sqrt((jac ** 2).sum((-2, -1))).max()
    return u.astype(np.float32)


@pytest.mark.parametrize("d", [2, 3])
def test_exp_of_zero_and_constant(d):
    shape = SHAPES[d]
    zero = np.zeros(shape + (d,), np.float32)
    np.testing.assert_array_equal(np.asarray(_integrate(zero)), zero)
    # A constant velocity is a translation: its flow at time 1 is that translation.
    t = np.broadcast_to(np.asarray([1.7, -2.3, 0.6][:d], np.float32), shape + (d,)).copy()
    np.testing.assert_allclose(np.asarray(_integrate(t)), t, rtol=1e-6, atol=1e-6)
    # steps = 0 is the identity approximation exp(v) ~= id + v.
    np.testing.assert_array_equal(np.asarray(integrate(jnp.asarray(t), steps=0)), t)


def _linear_velocity(d, seed):
    """v(x) = M (x - c) about the grid centre, with the expm oracle."""
    shape = SHAPES[d]
    rng = np.random.default_rng(seed)
    m = rng.uniform(-0.15, 0.15, (d, d))
    c = (np.asarray(shape) - 1) / 2.0
    x = _grid(shape) - c
    v = (x @ m.T).astype(np.float32)
    expected = x @ (scipy.linalg.expm(m) - np.eye(d)).T
    return v, expected


@pytest.mark.parametrize("d", DIMS_3D_SLOW)
def test_exp_of_linear_velocity_matches_expm(d):
    v, expected = _linear_velocity(d, seed=d)
    margin = 4  # border padding only changes voxels near the faces
    errors = []
    for steps in (2, 4, 6):
        err = np.abs(_interior(np.asarray(_integrate(v, steps=steps)) - expected, d, margin)).max()
        errors.append(err)
    assert errors[0] > errors[1] > errors[2], errors
    # First order in the step 2^-steps: two more squarings quarter the error.
    assert errors[1] < 0.3 * errors[0] and errors[2] < 0.3 * errors[1], errors
    err = np.abs(_interior(np.asarray(_integrate(v, steps=7)) - expected, d, margin)).max()
    assert err < 2e-3, err
    # The flow is far from the first-order field v itself.
    assert np.abs(_interior(v - expected, d, margin)).max() > 20 * err


@pytest.mark.parametrize("d", DIMS_3D_SLOW)
def test_exp_of_negative_velocity_is_inverse(d):
    shape = SHAPES[d]
    v = _smooth_field(shape, 0.8, np.random.default_rng(10 + d))
    fwd, bwd = _integrate(v), _integrate(-v)  # exp(-v) is the inverse map
    assert np.abs(np.asarray(fwd)).max() > 1.0  # non-trivial deformation
    for a, b in ((fwd, bwd), (bwd, fwd)):
        res = np.abs(_interior(np.asarray(_compose(a, b)), d, 4)).max()
        assert res < 5e-2, res


@pytest.mark.parametrize("d", DIMS_3D_SLOW)
def test_exp_has_positive_jacobian(d):
    shape = SHAPES[d]
    v = _smooth_field(shape, 2.0, np.random.default_rng(20 + d))
    # Used directly as a displacement, this v folds; its exponential does not.
    assert _jacobian_det(v).min() < 0
    det = _jacobian_det(_integrate(v))
    assert det.min() > 0, det.min()


def test_integrate_check_grads():
    v = np.random.default_rng(30).uniform(-1.5, 1.5, (5, 6, 2))
    with jax.enable_x64(True):
        check_grads(jax.jit(lambda v: integrate(v, steps=3)), (jnp.asarray(v),), order=1, modes=["rev"], eps=1e-6)


def test_loss_gradient_through_integrate():
    shape = SHAPES[2]
    x = _grid(shape)
    fixed = (np.sin(x[..., 0] / 3.0) * np.cos(x[..., 1] / 4.0)).astype(np.float32)
    moving = (np.sin((x[..., 0] - 1.0) / 3.0) * np.cos((x[..., 1] + 0.5) / 4.0)).astype(np.float32)

    def loss(v):
        return jnp.mean((warp(moving, integrate(v, steps=5)) - fixed) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss))  # one compile serves values and gradients
    # Finite at zero velocity (integer sample points: one-sided interpolation kinks).
    _, g0 = value_and_grad(np.zeros(shape + (2,), np.float32))
    assert np.isfinite(np.asarray(g0)).all() and float(jnp.abs(g0).max()) > 0
    # Directional derivative matches central finite differences at a smooth v.
    rng = np.random.default_rng(31)
    v = _smooth_field(shape, 0.3, rng)
    direction = _smooth_field(shape, 0.3, rng)
    _, g = value_and_grad(v)
    eps = 1e-2
    fd = (float(value_and_grad(v + eps * direction)[0]) - float(value_and_grad(v - eps * direction)[0])) / (2 * eps)
    np.testing.assert_allclose(float(np.vdot(np.asarray(g), direction)), fd, rtol=2e-2)
    # One gradient step lowers the loss.
    assert float(value_and_grad(v - 10.0 * g)[0]) < float(value_and_grad(v)[0])


def test_jitted_integrate_traces_once():
    traces = 0

    def fn(v):
        nonlocal traces
        traces += 1
        return integrate(v, steps=4)

    jitted = jax.jit(fn)
    rng = np.random.default_rng(40)
    v1 = rng.uniform(-1, 1, (6, 7, 2)).astype(np.float32)
    v2 = np.broadcast_to(np.asarray([0.5, -1.25], np.float32), (6, 7, 2)).copy()
    out1, out2 = jitted(v1), jitted(v2)
    assert traces == 1
    np.testing.assert_allclose(np.asarray(out2), v2, rtol=1e-6, atol=1e-6)  # the 2nd call computes its input
    assert np.abs(np.asarray(out1) - v1).max() > 1e-3
    jitted(np.zeros((6, 8, 2), np.float32))  # a new shape traces again
    assert traces == 2


def test_integrate_errors():
    with pytest.raises(ValueError):
        integrate(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        integrate(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="steps"):
        integrate(np.zeros((4, 4, 2), np.float32), steps=-1)
