"""MIND-SSC against a NumPy transliteration of the reference PyTorch MINDSSC."""
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from jaxreg.losses import descriptor_mse, mind_loss, mind_ssc


def mind_reference(img, radius, dilation):
    """Heinrich's PyTorch MINDSSC step by step (conv3d with one-hot kernels ==
    reading the replicate-padded image at ``x + idx * dilation``); 2D uses
    the 4-neighbourhood and the same pair rule, without the final reordering.
    """
    img = np.asarray(img[..., 0], np.float64)
    d = img.ndim
    if d == 3:
        nbh = np.array([[0, 1, 1], [1, 1, 0], [1, 0, 1], [1, 1, 2], [2, 1, 1], [1, 2, 1]])
        order = [6, 8, 1, 11, 2, 10, 0, 7, 9, 4, 5, 3]
    else:
        nbh = np.array([[0, 1], [1, 0], [1, 2], [2, 1]])
        order = None
    n = len(nbh)
    dist = ((nbh[:, None] - nbh[None]) ** 2).sum(-1)
    x, y = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    keep = (x > y).reshape(-1) & (dist == 2).reshape(-1)
    idx1 = np.repeat(nbh[:, None], n, 1).reshape(-1, d)[keep]
    idx2 = np.repeat(nbh[None], n, 0).reshape(-1, d)[keep]
    padded = np.pad(img, dilation, mode="edge")

    def conv(idx):
        return padded[tuple(slice(i * dilation, i * dilation + s) for i, s in zip(idx, img.shape))]

    diff = np.stack([(conv(a) - conv(b)) ** 2 for a, b in zip(idx1, idx2)])
    k = 2 * radius + 1
    padded_diff = np.pad(diff, [(0, 0)] + [(radius, radius)] * d, mode="edge")
    ssd = sliding_window_view(padded_diff, (k,) * d, axis=tuple(range(1, d + 1)))
    ssd = ssd.mean(axis=tuple(range(-d, 0)))
    mind = ssd - ssd.min(0, keepdims=True)
    var = mind.mean(0, keepdims=True)
    var = np.clip(var, var.mean() * 0.001, var.mean() * 1000)
    mind = np.exp(-mind / var)
    if order is not None:
        mind = mind[order]
    return np.moveaxis(mind, 0, -1)


# 3D with the reference defaults; 2D with other radius/dilation.
OPTIONS = {2: dict(radius=1, dilation=3), 3: dict(radius=2, dilation=2)}


def test_matches_reference_and_is_affine_invariant(dim, spatial, make_image, jitted):
    options = OPTIONS[dim]
    descriptor = jitted(mind_ssc, **options)
    img = make_image(0, spatial, sigma=1.0)
    desc = np.asarray(descriptor(img))
    assert desc.shape == (*spatial, {2: 4, 3: 12}[dim])
    np.testing.assert_allclose(desc, mind_reference(img, **options), rtol=1e-4, atol=1e-5)
    # Values in (0, 1], every voxel's largest channel is exactly 1.
    assert desc.min() > 0 and desc.max() <= 1 + 1e-6
    np.testing.assert_allclose(desc.max(-1), 1.0, rtol=1e-6)
    # Exactly invariant to a * image + b (up to float rounding).
    for a, b in [(3.0, 7.0), (-0.5, 2.0)]:
        np.testing.assert_allclose(np.asarray(descriptor(a * img + b)), desc, atol=2e-5)
    # A constant image has no structure: all ones, no NaN.
    np.testing.assert_array_equal(np.asarray(descriptor(np.full_like(img, 5.0))), 1.0)


def test_loss_zero_for_affine_remap_and_grows_with_shift(spatial, make_image, evaluator):
    f = make_image(0, spatial)
    values = evaluator(mind_loss).values([
        (f, f), (f, -2.0 * f + 1.0),
        (f, np.roll(f, 1, 0)), (f, np.roll(f, 2, 0)), (f, np.roll(f, 1, 1)),
    ])
    np.testing.assert_allclose(values[:2], 0.0, atol=1e-8)
    assert 1e-3 < values[2] < values[3] <= 1.0
    assert values[4] > 1e-3


def test_descriptor_mse_on_precomputed_descriptors(spatial, make_image, evaluator, jitted):
    f, m = make_image(0, spatial), make_image(1, spatial)
    descriptor = jitted(mind_ssc, radius=2, dilation=2)
    desc_f, desc_m = np.asarray(descriptor(f)), np.asarray(descriptor(m))
    w = np.zeros(spatial, np.float32)
    w[: spatial[0] // 2] = 1
    direct = evaluator(mind_loss).values([(f, m), (f, m, w)])
    on_desc = evaluator(descriptor_mse).values([(desc_f, desc_m), (desc_f, desc_m, w)])
    np.testing.assert_allclose(on_desc, direct, rtol=1e-5)
    np.testing.assert_allclose(on_desc[0], np.mean((desc_f - desc_m) ** 2), rtol=1e-5)
    np.testing.assert_allclose(on_desc[1], np.mean(((desc_f - desc_m) ** 2)[w > 0]), rtol=1e-5)


def test_bad_options_and_shapes_raise():
    img = jnp.zeros((8, 8, 1))
    with pytest.raises(ValueError, match="radius"):
        mind_ssc(img, radius=-1)
    with pytest.raises(ValueError, match="dilation"):
        mind_ssc(img, dilation=0)
    with pytest.raises(ValueError, match=r"image.*\(8, 8\)"):
        mind_ssc(jnp.zeros((8, 8)))
    with pytest.raises(ValueError, match=r"fixed_desc and moving_desc.*\(8, 8, 4\).*\(8, 8, 12\)"):
        descriptor_mse(jnp.zeros((8, 8, 4)), jnp.zeros((8, 8, 12)))
