"""Dice, dice_jax, dice_mean, dice30: closed-form overlaps and conventions."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg.metrics import dice, dice30, dice_jax, dice_mean


def _box(shape, lo, hi, value=1):
    m = np.zeros(shape, np.int32)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = value
    return m


@pytest.mark.parametrize("ndim", [2, 3])
def test_dice_of_two_shifted_boxes_is_exact_fraction(ndim):
    shape = (12,) * ndim
    a = _box(shape, (2,) * ndim, (8,) * ndim)
    b = _box(shape, (4,) + (2,) * (ndim - 1), (10,) + (8,) * (ndim - 1))
    # |A| = |B| = 6^D, |A & B| = 4 * 6^(D-1): Dice = 2 * 4 / (6 + 6) = 2/3.
    expected = 2.0 / 3.0
    np.testing.assert_allclose(dice(a, b), [expected], rtol=1e-12)
    np.testing.assert_allclose(dice_jax(jnp.asarray(a), jnp.asarray(b), labels=(1,)), [expected], rtol=1e-6)


def test_dice_two_labels_known_counts():
    a = np.array([[1, 1, 2], [2, 2, 0]])
    b = np.array([[1, 0, 2], [2, 0, 0]])
    # label 1: |A|=2 |B|=1 inter=1 -> 2/3; label 2: |A|=3 |B|=2 inter=2 -> 4/5
    np.testing.assert_allclose(dice(a, b), [2 / 3, 4 / 5], rtol=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_identical_maps_give_one_for_every_label(ndim):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 7, size=(10,) * ndim).astype(np.uint8)
    d = dice(x, x)
    assert d.shape == (6,)
    np.testing.assert_array_equal(d, np.ones(6))
    np.testing.assert_array_equal(dice_jax(jnp.asarray(x), jnp.asarray(x), labels=(1, 2, 3, 4, 5, 6)), np.ones(6))


def test_absent_labels_nan_one_sided_zero_and_order():
    a = np.array([[0, 3], [5, 5]])
    b = np.array([[0, 3], [0, 0]])
    # default: sorted union of nonzero labels present in either map
    np.testing.assert_allclose(dice(a, b), [1.0, 0.0])
    # explicit labels keep the caller's order; 9 is absent from both -> NaN; 0 only when asked
    d = dice(a, b, labels=[9, 5, 3, 0])
    assert np.isnan(d[0])
    np.testing.assert_allclose(d[1:], [0.0, 1.0, 2 * 1 / (1 + 3)])
    dj = np.asarray(dice_jax(jnp.asarray(a), jnp.asarray(b), labels=(9, 5, 3, 0)))
    np.testing.assert_allclose(dj, d, rtol=1e-6)
    assert dice_mean(d) == pytest.approx((0.0 + 1.0 + 0.5) / 3)


def test_dice_jax_matches_host_dice_and_does_not_retrace():
    rng = np.random.default_rng(1)
    a = rng.integers(-2, 40, size=(9, 11, 7)).astype(np.int16)
    b = np.where(rng.random(a.shape) < 0.7, a, rng.integers(-2, 40, size=a.shape)).astype(np.int16)
    labels = (30, 1, 2, 45, -2, 100000)  # unsorted, one absent, one outside int16
    ref = dice(a, b, labels=labels)
    traces = 0

    def f(p, t):
        nonlocal traces
        traces += 1
        return dice_jax(p, t, labels=labels)

    jf = jax.jit(f)
    out1 = jf(jnp.asarray(a), jnp.asarray(b))
    out2 = jf(jnp.asarray(b), jnp.asarray(a))
    assert traces == 1
    assert out1.dtype == jnp.float32 and out1.shape == (len(labels),)
    np.testing.assert_allclose(np.asarray(out1), ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out2), ref, rtol=1e-6)  # Dice is symmetric
    assert np.isnan(ref[3]) and np.isnan(ref[5])


def test_dice_accepts_bool_masks_and_jax_arrays():
    a = jnp.zeros((6, 6), bool).at[1:4, 1:4].set(True)
    b = jnp.zeros((6, 6), bool).at[2:5, 1:4].set(True)
    np.testing.assert_allclose(dice(a, b), [2 * 6 / 18])


@pytest.mark.parametrize("scores, expected", [
    (np.arange(1, 11) / 10.0, (0.1 + 0.2 + 0.3) / 3),          # n=10 -> k=3 (not 4: integer ceil)
    (np.array([0.9, 0.5, 0.7, 0.1, 0.3, 0.8, 0.6]), (0.1 + 0.3 + 0.5) / 3),  # n=7 -> k=ceil(2.1)=3
    (np.array([0.4]), 0.4),                                       # n=1 -> k=1
    (np.array([0.9, np.nan, 0.2, 0.5, np.nan]), 0.2),             # NaN dropped, n=3 -> k=1
    (np.array([0.8, 0.6, 0.4, 0.2]), (0.2 + 0.4) / 2),            # n=4 -> k=ceil(1.2)=2
])
def test_dice30_known_vectors_host_and_jax(scores, expected):
    assert dice30(scores) == pytest.approx(expected, rel=1e-12)
    assert float(jax.jit(dice30)(jnp.asarray(scores, jnp.float32))) == pytest.approx(expected, rel=1e-6)


def test_reducers_all_nan_give_nan_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(dice_mean(np.array([np.nan, np.nan])))
        assert np.isnan(dice30(np.array([np.nan])))
    assert np.isnan(float(dice30(jnp.array([jnp.nan]))))
    assert float(jax.jit(dice_mean)(jnp.array([0.5, jnp.nan, 1.0]))) == pytest.approx(0.75)


@pytest.mark.parametrize("pred, target, kwargs, match", [
    (np.zeros((4, 4), int), np.zeros((4, 5), int), {}, r"\(4, 4\) vs \(4, 5\)"),
    (np.zeros((4, 4), np.float32), np.zeros((4, 4), int), {}, "integer label map"),
    (np.zeros((4, 4), int), np.zeros((4, 4), np.float64), {}, "integer label map"),
    (np.zeros((4,), int), np.zeros((4,), int), {}, "2D or 3D"),
    (np.zeros((4, 4), int), np.zeros((4, 4), int), {"labels": [1.5, 2]}, "labels must be integers"),
    (np.zeros((4, 4), int), np.zeros((4, 4), int), {"labels": [1, 1]}, "duplicates"),
])
def test_dice_errors(pred, target, kwargs, match):
    with pytest.raises(ValueError, match=match):
        dice(pred, target, **kwargs)


def test_dice_jax_errors_at_trace_time():
    a = jnp.zeros((4, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"\(4, 4\) vs \(4, 3\)"):
        dice_jax(a, jnp.zeros((4, 3), jnp.int32), labels=(1,))
    with pytest.raises(ValueError, match="integer label map"):
        jax.jit(lambda p: dice_jax(p, a, labels=(1,)))(jnp.zeros((4, 4), jnp.float32))
    with pytest.raises(ValueError, match="labels must be integers"):
        dice_jax(a, a, labels=(1.0,))
    with pytest.raises(ValueError, match=r"\(L,\)"):
        dice30(np.zeros((2, 2)))
