"""Local MI: patch-wise oracle via masked global MI, single-patch limit."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg.losses import local_mi, mutual_information


def _patch_masks(spatial, patch):
    """One 0/1 mask per patch of the (end-padded) patch grid, and its size."""
    counts = [-(-n // patch) for n in spatial]
    masks = []
    for corner in np.ndindex(*counts):
        w = np.zeros(spatial, np.float32)
        w[tuple(slice(c * patch, (c + 1) * patch) for c in corner)] = 1
        masks.append(w)
    return masks


def test_is_weighted_mean_of_patch_mi(spatial, make_image, evaluator):
    patch = 8
    f, m = make_image(0, spatial), make_image(1, spatial) ** 2
    masks = _patch_masks(spatial, patch)
    # Put the global extremes inside every patch, so per-patch (masked)
    # normalisation equals local_mi's global one.
    for w in masks:
        idx = np.argwhere(w > 0)
        f[tuple(idx[0])], f[tuple(idx[-1])] = f.min(), f.max()
        m[tuple(idx[0])], m[tuple(idx[-1])] = m.max(), m.min()
    patch_mi = evaluator(mutual_information, grad=False, bins=16)
    per_patch = patch_mi.values([(f, m, w) for w in masks])
    sizes = np.array([w.sum() for w in masks])
    expected = np.sum(sizes * per_patch) / sizes.sum()
    values = evaluator(local_mi).values([(f, m), (m, f)])
    np.testing.assert_allclose(values[0], expected, rtol=1e-5)
    np.testing.assert_allclose(values[1], values[0], rtol=1e-5)  # symmetric
    assert values[0] < 0


def test_single_patch_equals_global_mi(make_image, evaluator):
    spatial = (24, 20)
    f, m = make_image(0, spatial), make_image(1, spatial)
    w = np.ones(spatial, np.float32)
    w[:5] = 0
    # patch 24 pads the 24 x 20 image to one 24 x 24 patch
    one_patch = evaluator(local_mi, grad=False, patch=24).values([(f, m), (f, m, w)])
    global_mi = evaluator(mutual_information, grad=False, bins=16).values([(f, m), (f, m, w)])
    np.testing.assert_allclose(one_patch, global_mi, rtol=1e-5)


def test_bad_patch_raises():
    img = jnp.zeros((8, 8, 1))
    for bad in (1, 4.0):
        with pytest.raises(ValueError, match="patch"):
            local_mi(img, img, patch=bad)
    with pytest.raises(ValueError, match="bins"):
        local_mi(img, img, bins=1)
