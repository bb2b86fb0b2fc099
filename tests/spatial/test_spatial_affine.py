"""Closed-form tests for jaxreg.spatial.affine.

Inputs are numpy arrays and library calls go through jitted wrappers (on CPU
op-by-op dispatch compiles every small op separately).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxreg.spatial import (
    affine_to_disp,
    fit_affine,
    fit_rigid,
    identity_params,
    matrix_to_params,
    num_params,
    params_to_matrix,
)

SHAPES = {2: (7, 9), 3: (5, 6, 7)}

_params_to_matrix = jax.jit(params_to_matrix, static_argnames="ndim")
_matrix_to_params = jax.jit(matrix_to_params)
_fit_affine = jax.jit(fit_affine)
_fit_rigid = jax.jit(fit_rigid)
_affine_to_disp = jax.jit(affine_to_disp, static_argnames="shape")


def _random_params(d, rng):
    n = num_params(d)
    return np.concatenate([
        rng.uniform(-5, 5, n["translation"]),
        rng.uniform(-0.6, 0.6, n["rotation"]),   # small angles: Euler angles unique
        rng.uniform(0.7, 1.4, n["scale"]),       # positive scales
        rng.uniform(-0.3, 0.3, n["shear"]),
    ]).astype(np.float32)


def _identity(d):
    return np.array(identity_params(d))  # writable numpy copy


def _random_matrix(d, rng):
    """A random homogeneous matrix with a positive determinant."""
    a = np.eye(d + 1)
    a[:d, :d] = np.eye(d) + rng.uniform(-0.4, 0.4, (d, d))
    if np.linalg.det(a[:d, :d]) < 0:
        a[:, 0] = -a[:, 0]
        a[d, 0] = 0.0
    a[:d, d] = rng.uniform(-10, 10, d)
    return a


def _rot(axis_pair, angle, d):
    """Rotation by ``angle`` in the plane of array axes (i -> j): R[i,i]=R[j,j]=c, R[j,i]=s, R[i,j]=-s."""
    i, j = axis_pair
    r = np.eye(d)
    r[i, i] = r[j, j] = np.cos(angle)
    r[j, i], r[i, j] = np.sin(angle), -np.sin(angle)
    return r


@pytest.mark.parametrize("d", [2, 3])
def test_num_and_identity_params(d):
    n = num_params(d)
    assert n == ({"translation": 2, "rotation": 1, "scale": 2, "shear": 1} if d == 2 else
                 {"translation": 3, "rotation": 3, "scale": 3, "shear": 3})
    p = _identity(d)
    assert p.shape == (sum(n.values()),)
    np.testing.assert_array_equal(np.asarray(_params_to_matrix(p, ndim=d)), np.eye(d + 1))
    np.testing.assert_array_equal(np.asarray(_params_to_matrix(p, ndim=d, center=np.full(d, 4.5))), np.eye(d + 1))


@pytest.mark.parametrize("d", [2, 3])
def test_params_to_matrix_closed_forms(d):
    n = num_params(d)
    rng = np.random.default_rng(0)
    # Translation only.
    t = rng.uniform(-5, 5, d)
    p = _identity(d)
    p[:d] = t
    expected = np.eye(d + 1)
    expected[:d, d] = t
    np.testing.assert_allclose(np.asarray(_params_to_matrix(p, ndim=d)), expected, atol=1e-6)
    # Scale only.
    s = rng.uniform(0.5, 2, d)
    i0 = n["translation"] + n["rotation"]
    p = _identity(d)
    p[i0:i0 + d] = s
    np.testing.assert_allclose(np.asarray(_params_to_matrix(p, ndim=d))[:d, :d], np.diag(s), atol=1e-6)
    # Single rotations: 2D in the plane 0 -> 1; 3D angle k about array axis k.
    planes = [(0, 1)] if d == 2 else [(1, 2), (2, 0), (0, 1)]
    for k, plane in enumerate(planes):
        angle = rng.uniform(-1, 1)
        p = _identity(d)
        p[d + k] = angle
        np.testing.assert_allclose(np.asarray(_params_to_matrix(p, ndim=d))[:d, :d], _rot(plane, angle, d),
                                   atol=1e-6)
    # 3D order: R = R_2(g) R_1(b) R_0(a).
    if d == 3:
        a, b, g = rng.uniform(-1, 1, 3)
        p = _identity(3)
        p[3:6] = a, b, g
        expected = _rot((0, 1), g, 3) @ _rot((2, 0), b, 3) @ _rot((1, 2), a, 3)
        np.testing.assert_allclose(np.asarray(_params_to_matrix(p, ndim=3))[:3, :3], expected, atol=1e-6)


@pytest.mark.parametrize("d", [2, 3])
def test_rotations_orthonormal(d):
    rng = np.random.default_rng(1)
    n = num_params(d)
    for _ in range(5):
        p = _identity(d)
        p[d:d + n["rotation"]] = rng.uniform(-np.pi, np.pi, n["rotation"])
        r = np.asarray(_params_to_matrix(p, ndim=d), np.float64)[:d, :d]
        np.testing.assert_allclose(r.T @ r, np.eye(d), atol=1e-6)
        np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-6)


@pytest.mark.parametrize("d", [2, 3])
def test_center_is_fixed_point_up_to_translation(d):
    rng = np.random.default_rng(2)
    p = _random_params(d, rng)
    c = rng.uniform(0, 10, d)
    a = np.asarray(_params_to_matrix(p, ndim=d, center=c), np.float64)
    np.testing.assert_allclose(a[:d, :d] @ c + a[:d, d], c + p[:d], atol=1e-4)
    # Same linear part as about the origin.
    np.testing.assert_allclose(a[:d, :d], np.asarray(_params_to_matrix(p, ndim=d))[:d, :d], atol=1e-6)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("centered", [False, True])
def test_params_matrix_round_trip(d, centered):
    rng = np.random.default_rng(3 + d)
    center = rng.uniform(0, 20, d) if centered else None
    for _ in range(5):
        p = _random_params(d, rng)
        back = _matrix_to_params(_params_to_matrix(p, ndim=d, center=center), center=center)
        np.testing.assert_allclose(np.asarray(back), p, atol=1e-4)
        # And matrix -> params -> matrix for a generic matrix with det > 0.
        a = _random_matrix(d, rng).astype(np.float32)
        again = _params_to_matrix(_matrix_to_params(a, center=center), ndim=d, center=center)
        np.testing.assert_allclose(np.asarray(again), a, atol=1e-4)


def _apply(a, pts):
    d = pts.shape[-1]
    return pts @ a[:d, :d].T + a[:d, d]


def _weighted_lstsq(src, dst, w):
    """Numpy oracle: argmin_A sum_i w_i |A [src_i; 1] - dst_i|^2 as a homogeneous matrix."""
    n, d = src.shape
    x = np.concatenate([src, np.ones((n, 1))], axis=1) * np.sqrt(w)[:, None]
    sol = np.linalg.lstsq(x, dst * np.sqrt(w)[:, None], rcond=None)[0]
    return np.concatenate([sol.T, np.eye(d + 1)[d:]], axis=0)


@pytest.mark.parametrize("d", [2, 3])
def test_fit_affine_recovers_known_affine(d):
    rng = np.random.default_rng(4)
    a = _random_matrix(d, rng)
    src = rng.uniform(0, 64, (20, d))
    fit = _fit_affine(src.astype(np.float32), _apply(a, src).astype(np.float32))
    np.testing.assert_allclose(np.asarray(fit), a, atol=1e-4)


@pytest.mark.parametrize("d", [2, 3])
def test_fit_affine_weights(d):
    rng = np.random.default_rng(5)
    a = _random_matrix(d, rng)
    src = rng.uniform(0, 64, (20, d))
    dst = _apply(a, src)
    dst[15:] += rng.uniform(20, 40, (5, d))  # 5 outliers, weight 0
    w = np.concatenate([np.ones(15), np.zeros(5)])
    f32 = lambda x: x.astype(np.float32)  # noqa: E731
    np.testing.assert_allclose(np.asarray(_fit_affine(f32(src), f32(dst), weights=f32(w))), a, atol=1e-4)
    assert np.abs(np.asarray(_fit_affine(f32(src), f32(dst))) - a).max() > 0.1  # outliers matter unweighted
    # General positive weights on noisy points: the weighted least-squares solution.
    noisy = _apply(a, src) + rng.normal(0, 1, (20, d))
    w = rng.uniform(0.1, 3.0, 20)
    np.testing.assert_allclose(np.asarray(_fit_affine(f32(src), f32(noisy), weights=f32(w))),
                               _weighted_lstsq(src, noisy, w), atol=2e-4)


def test_fit_affine_check_grads():
    rng = np.random.default_rng(6)
    src, dst, w = rng.uniform(0, 10, (8, 2)), rng.uniform(0, 10, (8, 2)), rng.uniform(0.5, 1.5, 8)
    with jax.enable_x64(True):
        check_grads(lambda s, t, w: _fit_affine(s, t, weights=w), tuple(map(jnp.asarray, (src, dst, w))),
                    order=1, modes=["rev"])


def _random_rotation(d, rng):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


@pytest.mark.parametrize("d", [2, 3])
def test_fit_rigid_recovers_any_rotation_even_from_coplanar_points(d):
    rng = np.random.default_rng(8)
    rot, t = _random_rotation(d, rng), rng.uniform(-20, 20, d)
    src = rng.uniform(0, 64, (30, d))
    if d == 3:
        src[:, 2] = 32.0 + rng.normal(0, 0.01, 30)  # (nearly) coplanar: fit_affine is ill posed, fit_rigid is not
    dst = src @ rot.T + t
    fit = np.asarray(_fit_rigid(src.astype(np.float32), dst.astype(np.float32)), np.float64)
    np.testing.assert_allclose(fit[:d, :d], rot, atol=1e-4)
    np.testing.assert_allclose(fit[:d, d], t, atol=5e-3)
    # noisy points: orthonormal, det +1, and the least-squares optimum among rotations (no better nearby one)
    noisy = dst + rng.normal(0, 2.0, dst.shape)
    fit = np.asarray(_fit_rigid(src.astype(np.float32), noisy.astype(np.float32)), np.float64)
    np.testing.assert_allclose(fit[:d, :d] @ fit[:d, :d].T, np.eye(d), atol=1e-5)
    assert np.linalg.det(fit[:d, :d]) == pytest.approx(1.0, abs=1e-5)
    cost = lambda m: np.sum((src @ m[:d, :d].T + m[:d, d] - noisy) ** 2)  # noqa: E731
    for _ in range(5):
        m = fit.copy()
        m[:d, :d] = fit[:d, :d] @ _small_rotation(d, rng)
        m[:d, d] = noisy.mean(0) - m[:d, :d] @ src.mean(0)
        assert cost(m) >= cost(fit) - 1e-6


def _small_rotation(d, rng):
    a = rng.normal(0, 0.02, (d, d))
    q, _ = np.linalg.qr(np.eye(d) + (a - a.T) / 2)
    return q * np.sign(np.linalg.det(q))


def test_fit_rigid_never_returns_a_reflection_and_honours_weights():
    rng = np.random.default_rng(9)
    src = rng.uniform(0, 64, (20, 3))
    mirrored = src * [-1.0, 1.0, 1.0]  # the best orthogonal map is a reflection
    fit = np.asarray(_fit_rigid(src.astype(np.float32), mirrored.astype(np.float32)))
    assert np.linalg.det(fit[:3, :3]) == pytest.approx(1.0, abs=1e-5)
    rot = _random_rotation(3, rng)
    dst = src @ rot.T
    dst[15:] += 50.0  # outliers with weight 0
    w = np.concatenate([np.ones(15), np.zeros(5)]).astype(np.float32)
    fit = np.asarray(_fit_rigid(src.astype(np.float32), dst.astype(np.float32), weights=w))
    np.testing.assert_allclose(fit[:3, :3], rot, atol=1e-4)
    with pytest.raises(ValueError, match="at least 3 points"):
        fit_rigid(jnp.zeros((2, 3)), jnp.zeros((2, 3)))


@pytest.mark.parametrize("d", [2, 3])
def test_affine_to_disp(d):
    rng = np.random.default_rng(7)
    a = _random_matrix(d, rng)
    shape = SHAPES[d]
    u = np.asarray(_affine_to_disp(a.astype(np.float32), shape), np.float64)
    assert u.shape == shape + (d,)
    x = np.stack(np.indices(shape), -1).astype(np.float64)
    np.testing.assert_allclose(u, x @ a[:d, :d].T + a[:d, d] - x, atol=1e-4)
    # det(I + grad u) = det(A) at every voxel (differences are exact for a linear field).
    jac = np.stack([np.stack(np.gradient(u[..., i]), -1) for i in range(d)], -2) + np.eye(d)
    np.testing.assert_allclose(np.linalg.det(jac), np.full(shape, np.linalg.det(a[:d, :d])), atol=1e-4)


@pytest.mark.parametrize("call", [
    lambda: num_params(4),
    lambda: _params_to_matrix(np.zeros(5), ndim=2),
    lambda: _params_to_matrix(np.zeros(12), ndim=2),
    lambda: _params_to_matrix(np.zeros(6), ndim=3),
    lambda: _fit_affine(np.zeros((20, 2)), np.zeros((20, 3))),
    lambda: _fit_affine(np.zeros((20, 2)), np.zeros((19, 2))),
    lambda: _fit_affine(np.zeros((20, 4)), np.zeros((20, 4))),
    lambda: _fit_affine(np.zeros((2, 2)), np.zeros((2, 2))),        # N < D + 1
    lambda: _fit_affine(np.zeros((3, 3)), np.zeros((3, 3))),
    lambda: _affine_to_disp(np.eye(3), (4, 4, 4)),
    lambda: _affine_to_disp(np.eye(4), (4, 4)),
    lambda: _affine_to_disp(np.zeros((3, 4)), (4, 4)),
    lambda: _matrix_to_params(np.zeros((3, 4))),
    lambda: _matrix_to_params(np.eye(5)),
])
def test_errors(call):
    with pytest.raises(ValueError):
        call()


def test_fit_affine_ridge_is_the_tikhonov_solution_and_fills_the_missing_direction_from_the_prior():
    rng = np.random.default_rng(6)
    a = _random_matrix(3, rng)
    src = rng.uniform(0, 64, (30, 3))
    dst = _apply(a, src) + rng.normal(0, 0.5, (30, 3))
    prior = _random_matrix(3, rng)[:3, :3]
    ridge = 0.3
    # direct: minimise |X A^T + 1 b^T - Y|^2 + ridge (N / D) s^2 |A - P|^2 (b unpenalised)
    xc = src - src.mean(0)
    s2 = np.mean(np.sum(xc**2, -1))
    mu = ridge * 30 / 3 * s2
    lin = np.linalg.solve(xc.T @ xc + mu * np.eye(3), xc.T @ (dst - dst.mean(0)) + mu * prior.T).T
    expect = np.eye(4)
    expect[:3, :3], expect[:3, 3] = lin, dst.mean(0) - lin @ src.mean(0)
    got = fit_affine(jnp.asarray(src, jnp.float32), jnp.asarray(dst, jnp.float32), ridge=ridge, prior=prior)
    np.testing.assert_allclose(np.asarray(got), expect, atol=2e-3)
    # coplanar points (z = 5): the plain fit is undetermined along z, the ridge takes the prior's z column
    flat = np.concatenate([rng.uniform(0, 64, (30, 2)), np.full((30, 1), 5.0)], 1)
    fit = np.asarray(fit_affine(jnp.asarray(flat, jnp.float32), jnp.asarray(_apply(a, flat), jnp.float32),
                                ridge=0.05, prior=a[:3, :3]))
    np.testing.assert_allclose(fit, a, atol=1e-3)
    with pytest.raises(ValueError, match="ridge"):
        fit_affine(jnp.asarray(src, jnp.float32), jnp.asarray(dst, jnp.float32), ridge=-1.0)
