"""Closed-form and reference tests for jaxreg.spatial.warp (sample, warp, warp_labels).

Inputs are built in numpy and every library call goes through one of the
jitted wrappers below, sharing shapes across tests: on CPU the cost of these
tests is XLA compilation, not arithmetic.
"""
import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.ndimage import map_coordinates
from jax.test_util import check_grads

from jaxreg.spatial import sample, warp, warp_labels

warp_module = importlib.import_module("jaxreg.spatial.warp")  # the module (jaxreg.spatial.warp is the function)

SHAPES = {2: (7, 6), 3: (5, 4, 6)}
OUT_SHAPES = {2: (6, 5), 3: (4, 3, 2)}  # sample() wants coords with D spatial axes
SHIFTS = {2: (2, -1), 3: (1, -2, 1)}
MODES = {"zeros": "constant", "border": "nearest"}
VALUES = (0, 1, 3, 7)
# Gradient cases compile for seconds in 3D: those run under `slow`.
DIMS_3D_SLOW = [2, pytest.param(3, marks=pytest.mark.slow)]

_warp = jax.jit(warp, static_argnames=("order", "padding"))
_sample = jax.jit(sample, static_argnames=("order", "padding"))
_warp_labels = jax.jit(warp_labels, static_argnames=("method", "label_values"))


def _const_disp(shift, shape):
    return np.broadcast_to(np.asarray(shift, np.float32), tuple(shape) + (len(shift),)).copy()


def _shift_oracle(image, shift, padding):
    """``out[x] = image[x + shift]`` with zero or clamped padding (numpy)."""
    shape = image.shape[:len(shift)]
    idx = np.indices(shape) + np.asarray(shift).reshape((-1,) + (1,) * len(shape))
    inside = np.all([(idx[i] >= 0) & (idx[i] < shape[i]) for i in range(len(shape))], axis=0)
    clipped = tuple(np.clip(idx[i], 0, shape[i] - 1) for i in range(len(shape)))
    out = image[clipped]
    if padding == "zeros":
        out = np.where(inside.reshape(inside.shape + (1,) * (out.ndim - inside.ndim)), out, 0)
    return out


def _map_coordinates_ref(image, coords, padding):
    """Reference linear sampler: map_coordinates(order=1) on each channel."""
    cs = [coords[..., i] for i in range(coords.shape[-1])]
    fn = lambda channel: map_coordinates(channel, cs, order=1, mode=MODES[padding], cval=0.0)  # noqa: E731
    return jax.vmap(fn, in_axes=-1, out_axes=-1)(image)


def _non_integer_coords(rng, shape, out_shape, lo=-2, hi_pad=1):
    """Random coords covering the grid and beyond, at least 0.05 from any integer
    (linear interpolation has kinks at integers, where one-sided derivatives differ)."""
    base = np.stack([rng.integers(lo, s + hi_pad, out_shape) for s in shape], axis=-1)
    return (base + rng.uniform(0.05, 0.95, base.shape)).astype(np.float32)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_identity_and_integer_translation_are_exact(d, order, padding):
    rng = np.random.default_rng(0)
    image = rng.standard_normal(SHAPES[d] + (2,)).astype(np.float32)
    out = _warp(image, np.zeros(SHAPES[d] + (d,), np.float32), order=order, padding=padding)
    np.testing.assert_array_equal(np.asarray(out), image)
    # Same compiled function: an integer translation is an exact shift, with
    # zeros or repeated edge values outside.
    shift = SHIFTS[d]
    out = _warp(image, _const_disp(shift, SHAPES[d]), order=order, padding=padding)
    np.testing.assert_allclose(np.asarray(out), _shift_oracle(image, shift, padding), rtol=0, atol=1e-6)


def test_warp_without_channel_axis():
    rng = np.random.default_rng(1)
    image = rng.standard_normal(SHAPES[2]).astype(np.float32)
    out = _warp(image, _const_disp((1, 1), SHAPES[2]))
    assert out.shape == SHAPES[2]
    np.testing.assert_allclose(np.asarray(out), _shift_oracle(image, (1, 1), "zeros"), rtol=0, atol=1e-6)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("channels", [1, 2])  # one channel: per-axis corner parts; several: a corner table
@pytest.mark.parametrize("table_points", [None, 1])  # 1: several channels take the per-corner form
def test_linear_sample_matches_map_coordinates(d, padding, channels, table_points, monkeypatch):
    if table_points is not None:
        monkeypatch.setattr(warp_module, "TABLE_POINTS", table_points)
    rng = np.random.default_rng(2)
    shape = SHAPES[d]
    image = rng.standard_normal(shape + (channels,)).astype(np.float32)
    # Uniform coords reaching 2 voxels outside the grid on every side.
    coords = np.stack([rng.uniform(-2, s + 1, OUT_SHAPES[d]) for s in shape], -1).astype(np.float32)
    out, ref = jax.jit(lambda im, c: (sample(im, c, padding=padding), _map_coordinates_ref(im, c, padding)))(
        image, coords)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d", DIMS_3D_SLOW)
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_linear_sample_vjp_matches_map_coordinates_autodiff(d, padding):
    rng = np.random.default_rng(3)
    shape = SHAPES[d]
    image = rng.standard_normal(shape + (2,)).astype(np.float32)
    coords = _non_integer_coords(rng, shape, OUT_SHAPES[d])
    weights = rng.standard_normal(OUT_SHAPES[d] + (2,)).astype(np.float32)

    def grad(fn):
        return jax.grad(lambda im, c: jnp.sum(weights * jnp.sin(fn(im, c))), argnums=(0, 1))

    ours, ref = jax.jit(lambda im, c: (grad(lambda i, x: sample(i, x, padding=padding))(im, c),
                                       grad(lambda i, x: _map_coordinates_ref(i, x, padding))(im, c)))(
        image, coords)
    for got, want in zip(ours, ref):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(ours[0]).max()) > 0.1 and float(jnp.abs(ours[1]).max()) > 0.1  # not trivially 0


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("table_points", [None, 1])
def test_one_sided_gradients_match_the_full_vjp(padding, channels, table_points, monkeypatch):
    """With only the image (constant points of a field) or only the coordinates (constant features)
    differentiated, the VJP skips the other side's work and still equals the map_coordinates reference
    (the forward pass then takes another form for the value: :func:`jaxreg.spatial.warp._sample_value`)."""
    if table_points is not None:
        monkeypatch.setattr(warp_module, "TABLE_POINTS", table_points)
    rng = np.random.default_rng(5)
    shape = SHAPES[3]
    image = jnp.asarray(rng.standard_normal(shape + (channels,)).astype(np.float32))
    coords = jnp.asarray(_non_integer_coords(rng, shape, OUT_SHAPES[3]))
    weights = rng.standard_normal(OUT_SHAPES[3] + (channels,)).astype(np.float32)

    def loss(fn, im, c):
        return jnp.sum(weights * jnp.sin(fn(im, c)))

    ours = lambda i, x: sample(i, x, padding=padding)  # noqa: E731
    ref = lambda i, x: _map_coordinates_ref(i, x, padding)  # noqa: E731
    for argnum in (0, 1):
        got = jax.jit(jax.grad(lambda im, c: loss(ours, im, c), argnums=argnum))(image, coords)
        want = jax.jit(jax.grad(lambda im, c: loss(ref, im, c), argnums=argnum))(image, coords)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
        assert float(jnp.abs(got).max()) > 0.1


@pytest.mark.parametrize("d", DIMS_3D_SLOW)
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_sample_check_grads(d, padding):
    rng = np.random.default_rng(4)
    shape = {2: (4, 5), 3: (3, 4, 3)}[d]
    image = rng.standard_normal(shape + (2,))
    coords = _non_integer_coords(rng, shape, (3, 4, 2)[:d], lo=-1, hi_pad=0).astype(np.float64)
    with jax.enable_x64(True):
        fn = jax.jit(lambda im, c: sample(im, c, padding=padding))
        check_grads(fn, (jnp.asarray(image), jnp.asarray(coords)), order=1, modes=["rev"], eps=1e-5)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_nearest_sample(d, padding):
    rng = np.random.default_rng(5)
    shape = SHAPES[d]
    image = rng.standard_normal(shape + (2,)).astype(np.float32)
    coords = np.stack([rng.uniform(-2, s + 1, OUT_SHAPES[d]) for s in shape], -1).astype(np.float32)
    flat = coords.reshape(-1, d)
    flat[:3] = np.asarray([-0.5, 1.5, 2.5] * 3)[:3 * d].reshape(3, d)  # ties: half rounds up
    flat[3] = -0.6                                                       # rounds to -1: outside
    out = np.asarray(_sample(image, coords, order=0, padding=padding))
    idx = np.floor(coords + 0.5).astype(int)
    inside = np.all((idx >= 0) & (idx < np.asarray(shape)), axis=-1)
    clipped = np.clip(idx, 0, np.asarray(shape) - 1)
    expected = image[tuple(clipped[..., i] for i in range(d))]
    if padding == "zeros":
        expected = np.where(inside[..., None], expected, 0.0)
    np.testing.assert_array_equal(out, expected)


def _labels(shape, rng):
    return rng.choice(np.asarray(VALUES, np.int32), size=shape)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("method", ["nearest", "linear"])
def test_warp_labels_integer_shift_is_exact(d, method):
    rng = np.random.default_rng(6)
    labels = _labels(SHAPES[d], rng)
    shift = SHIFTS[d]
    out = _warp_labels(labels, _const_disp(shift, SHAPES[d]), method=method, label_values=VALUES)
    assert out.dtype == labels.dtype
    # nearest clamps at the border (documented); linear gives 0 outside.
    padding = "border" if method == "nearest" else "zeros"
    np.testing.assert_array_equal(np.asarray(out), _shift_oracle(labels, shift, padding))


def _half_shift_oracle(labels, values):
    """Linear label warp at ``x + 0.5`` (every axis), derived by hand: each
    label's probability is the fraction of the 2^D voxels ``x + o``,
    ``o in {0, 1}^D``, that carry it (voxels outside count for no label).
    Returns the arg-max, whether it is unique, and the probabilities."""
    d = labels.ndim
    padded = np.pad(labels, [(0, 1)] * d, constant_values=-1)
    probs = np.zeros((len(values),) + labels.shape)
    for o in itertools.product((0, 1), repeat=d):
        window = padded[tuple(slice(k, k + n) for k, n in zip(o, labels.shape))]
        probs += np.stack([window == v for v in values]) / 2 ** d
    unique = (probs == probs.max(0)).sum(0) == 1
    return np.asarray(values)[probs.argmax(0)], unique, probs


@pytest.mark.parametrize("d", [2, 3])
def test_warp_labels_linear_half_voxel_shift(d):
    rng = np.random.default_rng(7)
    shape = SHAPES[d]
    labels = _labels(shape, rng)
    if d == 2:
        # Hand example: 3 of the 4 voxels around (1.5, 1.5) are label 3, so
        # linear picks 3; nearest rounds to voxel (2, 2), label 7.
        labels[1:3, 1:3] = [[3, 3], [3, 7]]
    disp = np.full(shape + (d,), 0.5, np.float32)
    out = np.asarray(_warp_labels(labels, disp, method="linear", label_values=VALUES))
    expected, unique, probs = _half_shift_oracle(labels, VALUES)
    assert unique.sum() > labels.size // 3
    np.testing.assert_array_equal(out[unique], expected[unique])
    # Where labels tie, the result is one of the tied labels.
    chosen = np.take_along_axis(probs, np.searchsorted(VALUES, out)[None], 0)[0]
    np.testing.assert_array_equal(chosen, probs.max(0))
    if d == 2:
        assert out[1, 1] == 3
        assert int(_warp_labels(labels, disp, method="nearest", label_values=VALUES)[1, 1]) == 7


def test_warp_labels_linear_default_label_values():
    # Default label_values = np.unique(labels), computed on the host (eager path).
    rng = np.random.default_rng(8)
    labels = _labels(SHAPES[2], rng)
    disp = rng.uniform(-1.5, 1.5, SHAPES[2] + (2,)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(warp_labels(jnp.asarray(labels), jnp.asarray(disp), method="linear")),
                                  np.asarray(_warp_labels(labels, disp, method="linear", label_values=VALUES)))


@pytest.mark.parametrize("call", [
    lambda: sample(np.zeros((4, 4)), np.zeros((3, 3, 4))),             # D = 4
    lambda: sample(np.zeros((4, 4)), np.zeros((2,))),                  # coords without a point axis
    lambda: sample(np.zeros((4, 4, 4, 4, 1)), np.zeros((3, 3, 3))),    # image rank too high
    lambda: sample(np.zeros((4,)), np.zeros((3, 3, 2))),               # image rank too low
    lambda: sample(np.zeros((4, 4)), np.zeros((3, 3, 2)), order=3),
    lambda: sample(np.zeros((4, 4)), np.zeros((3, 3, 2)), padding="reflect"),
    lambda: warp(np.zeros((4, 4)), np.zeros((4, 4, 3))),               # D != len(spatial)
    lambda: warp(np.zeros((4, 4)), np.zeros((4, 4))),                  # no vector axis
    lambda: warp(np.zeros((4, 4, 4, 1, 1)), np.zeros((4, 4, 2), np.float32)),  # image rank too high
    lambda: warp_labels(np.zeros((4, 4), np.float32), np.zeros((4, 4, 2))),  # float labels
    lambda: warp_labels(np.zeros((4, 4, 1), np.int32), np.zeros((4, 4, 2))),
    lambda: warp_labels(np.zeros((4, 4), np.int32), np.zeros((4, 4, 2)), method="cubic"),
])
def test_errors(call):
    with pytest.raises(ValueError):
        call()


def test_sample_point_list_matches_grid_layout():
    # coords may have any leading shape: an (N, D) point list samples the same
    # values as the same points laid out on a grid.
    rng = np.random.default_rng(3)
    image = rng.standard_normal((7, 6, 2)).astype(np.float32)
    pts = rng.uniform(-1, 7, (12, 2)).astype(np.float32)
    on_grid = sample(image, pts.reshape(3, 4, 2))
    np.testing.assert_allclose(np.asarray(sample(image, pts)), np.asarray(on_grid).reshape(12, 2), atol=1e-6)


def test_grad_with_closed_over_numpy_image():
    # Regression: a numpy image captured by jit(grad(...)) reached the custom
    # VJP's backward pass as a numpy array and was indexed with a tracer
    # (TracerArrayConversionError).
    rng = np.random.default_rng(9)
    image = rng.standard_normal(SHAPES[2] + (2,)).astype(np.float32)
    disp = rng.uniform(-1, 1, SHAPES[2] + (2,)).astype(np.float32)
    grad = jax.grad(lambda u, im: jnp.sum(warp(im, u) ** 2))
    grad_np, grad_jnp = jax.jit(lambda u, im: (grad(u, image), grad(u, im)))(disp, image)
    np.testing.assert_allclose(np.asarray(grad_np), np.asarray(grad_jnp), rtol=1e-6, atol=1e-6)
