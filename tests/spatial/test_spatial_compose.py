"""Closed-form tests for jaxreg.spatial.compose (compose, invert, resize_disp).

Inputs are numpy arrays and library calls go through shared jitted wrappers:
on CPU these tests cost XLA compilations, so shapes are reused.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from jaxreg.spatial import compose, invert, resize_disp, warp

SHAPES = {2: (24, 20), 3: (12, 10, 11)}
MARGIN = 4  # voxels ignored at each face, where border padding departs from the smooth field

_compose = jax.jit(compose)
_invert = jax.jit(invert, static_argnames="iterations")
# Iteration count traced (fori_loop becomes a while loop): one compile for all counts.
_invert_n = jax.jit(lambda u, n: invert(u, iterations=n))
_warp = jax.jit(warp, static_argnames=("order", "padding"))
_resize = jax.jit(resize_disp, static_argnames="shape")


def _grid(shape):
    return np.stack(np.indices(shape), axis=-1).astype(np.float64)


def _interior(a, d, margin=MARGIN):
    return np.asarray(a)[(slice(margin, -margin),) * d]


def _jacobian(u):
    """Central-difference Jacobian ``(*spatial, D, D)``, ``J[..., i, j] = du_i/dx_j``."""
    d = u.shape[-1]
    return np.stack([np.stack(np.gradient(u[..., i]), axis=-1) for i in range(d)], axis=-2)


def smooth_field(shape, max_grad, rng, sigma=3.0):
    """Random smooth float32 field scaled so that max_x ||grad u(x)||_F = ``max_grad``."""
    d = len(shape)
    u = np.stack([gaussian_filter(rng.standard_normal(shape), sigma, mode="nearest") for _ in range(d)], -1)
    u *= max_grad / np.sqrt((_jacobian(u) ** 2).sum((-2, -1))).max()
    return u.astype(np.float32)


def _const(vector, shape):
    return np.broadcast_to(np.asarray(vector, np.float32), tuple(shape) + (len(vector),)).copy()


@pytest.mark.parametrize("d", [2, 3])
def test_compose_with_zero_and_translations(d):
    shape = SHAPES[d]
    u = smooth_field(shape, 0.4, np.random.default_rng(0))
    zero = np.zeros_like(u)
    np.testing.assert_array_equal(np.asarray(_compose(u, zero)), u)
    np.testing.assert_array_equal(np.asarray(_compose(zero, u)), u)
    # Two constant translations add.
    a, b = _const([1.25, -0.5, 2.0][:d], shape), _const([-3.0, 0.75, 0.5][:d], shape)
    np.testing.assert_allclose(np.asarray(_compose(a, b)), a + b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("d", [2, 3])
def test_compose_matches_sequential_warps(d):
    shape = SHAPES[d]
    rng = np.random.default_rng(1)
    a = smooth_field(shape, 0.4, rng)
    # b includes a shift, so the two orders differ by about grad(a) . shift.
    b = smooth_field(shape, 0.4, rng) + np.asarray([1.5, -1.0, 0.5][:d], np.float32)
    # Moving image = its own coordinates (D channels). Linear interpolation is
    # exact for it, so warp(warp(m, a), b) = warp(m, compose(a, b)) holds to
    # rounding in the interior, while the other order differs visibly.
    moving = _grid(shape).astype(np.float32)
    sequential = _warp(_warp(moving, a), b)
    direct = _warp(moving, _compose(a, b))
    wrong_order = _warp(moving, _compose(b, a))
    np.testing.assert_allclose(_interior(direct, d), _interior(sequential, d), rtol=0, atol=1e-4)
    assert np.abs(_interior(sequential, d) - _interior(wrong_order, d)).max() > 0.05
    # A smooth non-linear image: equal up to interpolation error.
    image = np.sin(2 * np.pi * moving / 20.0 + np.arange(d)).astype(np.float32)
    err = np.abs(_interior(_warp(_warp(image, a), b), d) - _interior(_warp(image, _compose(a, b)), d)).max()
    assert err < 0.03, err


def test_compose_shape_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        compose(np.zeros((4, 4, 2)), np.zeros((4, 5, 2)))
    with pytest.raises(ValueError):
        compose(np.zeros((4, 4, 3)), np.zeros((4, 4, 3)))


@pytest.mark.parametrize("d", [2, 3])
def test_invert_smooth_field(d):
    u = smooth_field(SHAPES[d], 0.45, np.random.default_rng(2))
    assert np.abs(u).max() > 0.5  # a non-trivial displacement

    def residual(v):
        return np.abs(_interior(_compose(u, v), d)).max()

    # |compose(u, v_n)| = |v_n - v_{n+1}| shrinks geometrically (contraction).
    errors = [residual(_invert_n(u, n)) for n in (1, 2, 3, 4)]  # stop before the float32 floor
    assert all(e1 < e0 for e0, e1 in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.05 * errors[0], errors
    v = _invert(u)  # default iterations (static)
    assert residual(v) < 1e-2
    # v is also a left inverse (phi_v o phi_u ~= id), up to interpolation error.
    assert np.abs(_interior(_compose(v, u), d)).max() < 5e-2


@pytest.mark.parametrize("d", [2, 3])
def test_invert_translation(d):
    t = _const([1.5, -2.25, 0.5][:d], SHAPES[d])
    np.testing.assert_allclose(np.asarray(_invert(t)), -t, rtol=0, atol=1e-6)


# Integer per-axis factors 2, 3 (, 2). Antialiased linear downsampling by a
# non-integer factor is not exactly linear-preserving (off by ~1e-3 voxel).
SMALL = {2: (8, 10), 3: (6, 8, 10)}
LARGE = {2: (16, 30), 3: (12, 24, 20)}


@pytest.mark.parametrize("d", [2, 3])
def test_resize_constant_field(d):
    old, new = SMALL[d], LARGE[d]
    c = np.asarray([0.5, -1.5, 2.0][:d], np.float32)
    out = np.asarray(_resize(_const(c, old), shape=new))
    assert out.shape == new + (d,)
    # Same physical displacement: the vector in new voxels is scaled by new/old.
    factor = np.asarray(new) / np.asarray(old)
    np.testing.assert_allclose(out, _const(c * factor, new), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(_resize(out, shape=old)), _const(c, old), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("direction", ["up", "down"])
def test_resize_linear_field(d, direction):
    old, new = (SMALL[d], LARGE[d]) if direction == "up" else (LARGE[d], SMALL[d])
    rng = np.random.default_rng(3)
    g = rng.uniform(-0.2, 0.2, (d, d))
    c = rng.uniform(-1, 1, d)
    u = (_grid(old) @ g.T + c).astype(np.float32)
    out = np.asarray(_resize(u, shape=new))
    # Voxel centres aligned: x_old = (x_new + 0.5) / s - 0.5; vectors scale by s.
    s = np.asarray(new) / np.asarray(old)
    expected = (((_grid(new) + 0.5) / s - 0.5) @ g.T + c) * s
    np.testing.assert_allclose(_interior(out, d, 2), _interior(expected, d, 2), rtol=0, atol=1e-4)
    # The slope changes with the grid: not the input field read on the new grid.
    assert np.abs(_interior(out, d, 2) - _interior(_grid(new) @ g.T + c, d, 2)).max() > 0.1


def test_resize_same_shape_and_errors():
    u = jnp.ones((4, 5, 2))
    assert resize_disp(u, (4, 5)) is u
    with pytest.raises(ValueError):
        resize_disp(u, (8, 10, 2))
    with pytest.raises(ValueError):
        resize_disp(jnp.ones((4, 5, 3)), (8, 10))
