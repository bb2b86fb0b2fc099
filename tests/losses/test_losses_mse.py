"""MSE: closed-form values, masks (bool/float/trailing axis), channels."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg.losses import mse


def test_closed_form_values(spatial, make_image, evaluator):
    f = make_image(0, spatial)
    m = make_image(1, spatial)
    values = evaluator(mse).values([
        (f, f + 0.25), (np.zeros_like(f), np.full_like(f, 3.0)), (f, m), (m, f),
    ])
    np.testing.assert_allclose(values[:2], [0.0625, 9.0], rtol=1e-6)
    np.testing.assert_allclose(values[2], np.mean((f - m) ** 2), rtol=1e-5)
    assert values[2] == values[3]  # symmetric


def test_mask_is_a_weighted_mean(spatial, make_image, evaluator, jitted):
    f, m = make_image(0, spatial), make_image(1, spatial)
    w = np.zeros(spatial, np.float32)
    w[: spatial[0] // 3] = 1.0
    w[spatial[0] // 3 : spatial[0] // 2] = 0.25
    expected = np.sum(w[..., None] * (f - m) ** 2) / np.sum(w)
    values = evaluator(mse).values([(f, m, w), (f, m, np.zeros(spatial))])
    np.testing.assert_allclose(values[0], expected, rtol=1e-5)
    assert values[1] == 0.0  # empty mask
    # bool masks and (*spatial, 1) masks mean the same
    b = w > 0
    loss = jitted(mse)
    both = float(loss(f, m, mask=b))
    np.testing.assert_allclose(both, np.mean(((f - m) ** 2)[b]), rtol=1e-5)
    np.testing.assert_allclose(float(loss(f, m, mask=b[..., None])), both, rtol=1e-6)


def test_channels_are_averaged_and_ints_promoted(jitted):
    rng = np.random.default_rng(0)
    f, m = rng.normal(size=(2, 6, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(float(jitted(mse)(f, m)), np.mean((f - m) ** 2), rtol=1e-5)
    value = jitted(mse)(np.zeros((4, 4, 1), np.int32), np.full((4, 4, 1), 2, np.int32))
    assert value.dtype == jnp.float32 and float(value) == 4.0


def test_bad_mask_rank_raises():
    with pytest.raises(ValueError, match="mask"):
        mse(jnp.zeros((4, 4, 1)), jnp.zeros((4, 4, 1)), mask=jnp.ones((4, 4, 2)))
