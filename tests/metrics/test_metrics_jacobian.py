"""Jacobian determinant and regularity metrics: affine, reflection, quadratic closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxreg.metrics import folding_percent, jacobian_det, jacobian_grad_magnitude, sdlogj

SHAPES = {2: (9, 11), 3: (7, 8, 6)}


def _coords(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)


def _affine_disp(shape, a, t):
    x = _coords(shape)
    return jnp.asarray(x @ (a - np.eye(len(shape))).T + t, jnp.float32)


def _random_field(shape, seed, scale):
    rng = np.random.default_rng(seed)
    return jnp.asarray(scale * rng.standard_normal((*shape, len(shape))), jnp.float32)


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_field_has_constant_det_a(ndim):
    rng = np.random.default_rng(ndim)
    a = np.eye(ndim) + 0.2 * rng.standard_normal((ndim, ndim))
    if np.linalg.det(a) < 0:
        a[0] *= -1  # orientation-preserving
    t = rng.uniform(-3, 3, ndim)
    disp = _affine_disp(SHAPES[ndim], a, t)
    det = jacobian_det(disp)
    assert det.shape == SHAPES[ndim] and det.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(det), np.linalg.det(a), rtol=1e-5, atol=1e-5)
    assert float(folding_percent(disp)) == 0.0
    assert float(sdlogj(disp)) == pytest.approx(0.0, abs=1e-5)
    assert float(jacobian_grad_magnitude(disp)) == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_reflection_folds_everywhere(ndim):
    a = np.diag([-1.0] + [1.0] * (ndim - 1)) * 1.5
    disp = _affine_disp(SHAPES[ndim], a, np.zeros(ndim))
    det = np.asarray(jacobian_det(disp))
    np.testing.assert_allclose(det, np.linalg.det(a), rtol=1e-6)
    assert float(folding_percent(disp)) == pytest.approx(100.0, rel=1e-6)
    # every det clipped to 1e-9: log is the constant -20.7, std 0 up to float32 rounding of the mean
    assert float(sdlogj(disp)) == pytest.approx(0.0, abs=20.7 * 4e-6)


@pytest.mark.parametrize("ndim", [2, 3])
def test_identity_is_exact(ndim):
    disp = jnp.zeros((*SHAPES[ndim], ndim), jnp.float32)
    np.testing.assert_array_equal(np.asarray(jacobian_det(disp)), 1.0)
    assert float(folding_percent(disp)) == 0.0
    assert float(sdlogj(disp)) == 0.0
    assert float(jacobian_grad_magnitude(disp)) == 0.0


def test_gradients_finite_at_identity():
    # double-where in the std and the norm: sqrt'(0) would give NaN
    disp = jnp.zeros((*SHAPES[2], 2), jnp.float32)
    g = jax.jit(jax.grad(lambda u: sdlogj(u) + jacobian_grad_magnitude(u)))(disp)
    np.testing.assert_array_equal(np.asarray(g), 0.0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_quadratic_field_matches_analytic_det_in_interior(ndim):
    rng = np.random.default_rng(10 + ndim)
    shape = SHAPES[ndim]
    q = 0.02 * rng.standard_normal((ndim, ndim, ndim))  # u_i(x) = x^T Q_i x
    x = _coords(shape)
    disp = jnp.asarray(np.einsum("...j,ijk,...k->...i", x, q, x), jnp.float32)
    grad_u = np.einsum("ijk,...k->...ij", q + q.transpose(0, 2, 1), x)  # d u_i / d x_j
    expected = np.linalg.det(np.eye(ndim) + grad_u)
    interior = (slice(1, -1),) * ndim
    det = np.asarray(jacobian_det(disp))
    np.testing.assert_allclose(det[interior], expected[interior], rtol=1e-4, atol=1e-4)
    # on the border the one-sided difference is first order only: it must differ somewhere
    assert np.max(np.abs(det - expected)) > 1e-3


@pytest.mark.parametrize("ndim", [2, 3])
def test_matches_numpy_gradient_reference_including_borders(ndim):
    disp = _random_field(SHAPES[ndim], ndim, 0.6)
    u = np.asarray(disp, np.float64)
    grad = np.stack([np.stack(np.gradient(u[..., i]), axis=-1) for i in range(ndim)], axis=-2)
    ref = np.linalg.det(np.eye(ndim) + grad)
    det = np.asarray(jacobian_det(disp))
    np.testing.assert_allclose(det, ref, rtol=1e-5, atol=1e-5)

    mask = np.zeros(SHAPES[ndim], bool)
    mask[(slice(1, 5),) * ndim] = True
    assert float(folding_percent(disp, mask=mask)) == pytest.approx(100 * np.mean(ref[mask] <= 0), abs=1e-4)
    assert float(folding_percent(disp)) == pytest.approx(100 * np.mean(ref <= 0), abs=1e-4)
    logj = np.log(np.clip(ref, 1e-9, 1e9))
    assert float(sdlogj(disp, mask=mask)) == pytest.approx(logj[mask].std(), rel=1e-4)
    assert float(sdlogj(disp)) == pytest.approx(logj.std(), rel=1e-4)
    gmag = np.sqrt(sum(g ** 2 for g in np.gradient(ref)))
    assert float(jacobian_grad_magnitude(disp, mask=mask)) == pytest.approx(gmag[mask].mean(), rel=1e-4)
    assert 0 < float(folding_percent(disp)) < 100  # the field does fold somewhere: the test can fail


def test_size_two_axis_uses_one_sided_differences():
    disp = _affine_disp((2, 5), np.array([[2.0, 0.5], [0.0, 1.0]]), np.zeros(2))
    np.testing.assert_allclose(np.asarray(jacobian_det(disp)), 2.0, rtol=1e-6)


def test_jitted_no_retrace_and_empty_mask_nan():
    traces = 0

    def f(d, m):
        nonlocal traces
        traces += 1
        return folding_percent(d, mask=m), sdlogj(d, mask=m), jacobian_grad_magnitude(d, mask=m)

    jf = jax.jit(f)
    d = _random_field(SHAPES[3], 0, 0.3)
    m = jnp.ones(SHAPES[3], bool)
    out1 = jf(d, m)
    jf(d * 2.0, m)
    assert traces == 1
    assert float(out1[1]) == pytest.approx(float(sdlogj(d)), rel=1e-5)
    empty = jf(d, jnp.zeros(SHAPES[3], bool))
    assert all(np.isnan(float(v)) for v in empty)


def test_jacobian_det_gradient_check():
    disp = _random_field((5, 4), 2, 0.2)
    check_grads(jax.jit(lambda u: jacobian_det(u).sum() + (jacobian_det(u) ** 2).sum()), (disp,),
                order=1, modes=("rev",), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("shape, match", [
    ((8, 8, 3), r"\(8, 8, 3\)"),
    ((8, 8), r"\(8, 8\)"),
    ((8, 8, 8, 2), r"\(8, 8, 8, 2\)"),
    ((8, 1, 2), r"size must be >= 2"),
])
def test_bad_disp_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        jacobian_det(jnp.zeros(shape, jnp.float32))


def test_bad_mask_and_dtype():
    disp = jnp.zeros((6, 6, 2), jnp.float32)
    with pytest.raises(ValueError, match=r"mask shape \(6, 5\) does not match spatial shape \(6, 6\)"):
        folding_percent(disp, mask=jnp.ones((6, 5), bool))
    with pytest.raises(ValueError, match="floating point"):
        sdlogj(jnp.zeros((6, 6, 2), jnp.int32))
