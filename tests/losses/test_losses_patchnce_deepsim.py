"""PatchNCE (ContraReg) and DeepSim losses: hand-computed values, mask sampling, minima, shapes and errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg import losses as L


def _infonce_loop(q, k, tau):
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    out = []
    for i in range(len(q)):
        logits = np.array([q[i] @ k[j] / tau for j in range(len(k))])
        out.append(-np.log(np.exp(logits[i]) / np.exp(logits).sum()))
    return float(np.mean(out))


def test_patchnce_equals_a_direct_loop_over_all_locations():
    rng = np.random.default_rng(0)
    q1, k1 = rng.normal(size=(3, 2, 5)), rng.normal(size=(3, 2, 5))  # 6 locations, 5 channels
    q2, k2 = rng.normal(size=(2, 2, 3)), rng.normal(size=(2, 2, 3))
    got = L.patchnce([jnp.asarray(q1), jnp.asarray(q2)], [jnp.asarray(k1), jnp.asarray(k2)], jax.random.key(0),
                     num_samples=6, temperature=0.5)  # layer 2 has 4 voxels: all of them
    want = 0.5 * (_infonce_loop(q1.reshape(-1, 5), k1.reshape(-1, 5), 0.5)
                  + _infonce_loop(q2.reshape(-1, 3), k2.reshape(-1, 3), 0.5))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_patchnce_projections_are_applied_before_normalisation():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(4, 4, 3)), rng.normal(size=(4, 4, 3))
    double = (lambda v: 2.0 * v[:, :2], lambda v: v[:, 1:])
    got = L.patchnce([jnp.asarray(q)], [jnp.asarray(k)], jax.random.key(3), num_samples=16, temperature=0.1,
                     projections=[double])
    want = _infonce_loop(q.reshape(-1, 3)[:, :2], k.reshape(-1, 3)[:, 1:], 0.1)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_masked_patchnce_samples_only_inside_the_mask():
    """With exactly num_samples voxels inside, the loss is the loop over those voxels: nothing outside is drawn."""
    rng = np.random.default_rng(2)
    q, k = rng.normal(size=(8, 8, 4)), rng.normal(size=(8, 8, 4))
    mask = np.zeros((8, 8), np.float32)
    mask[2:5, 3:6] = 1  # 9 voxels
    inside = mask > 0
    for seed in range(3):
        got = L.patchnce([jnp.asarray(q)], [jnp.asarray(k)], jax.random.key(seed), num_samples=9,
                         temperature=0.2, mask=jnp.asarray(mask))
        np.testing.assert_allclose(float(got), _infonce_loop(q[inside], k[inside], 0.2), rtol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_resized_mask_samples_stay_inside_on_coarse_layers(seed):
    mask = np.zeros((32, 48), np.float32)
    mask[5:20, 10:40] = 1
    for shape in ((32, 48), (16, 24), (8, 12), (4, 6)):
        m = L.resize_mask(jnp.asarray(mask), shape)
        pts, w = L.sample_in_mask(jax.random.key(seed), m, min(40, int(np.prod(shape))))
        pts, w = np.asarray(pts), np.asarray(w)
        assert np.all(np.asarray(m)[pts[w > 0, 0], pts[w > 0, 1]])
        # the resized mask lies inside the mask's bounding box, in that layer's voxels
        scale = 32 // shape[0]
        assert np.all(pts[w > 0, 0] * scale >= 5 - scale) and np.all(pts[w > 0, 0] * scale < 20 + scale)


def test_patchnce_is_lowest_for_matching_features():
    rng = np.random.default_rng(3)
    f = jnp.asarray(rng.normal(size=(16, 16, 8)))
    aligned = L.patchnce([f], [f], jax.random.key(0), num_samples=64, temperature=0.07)
    shifted = L.patchnce([f], [jnp.roll(f, 2, axis=0)], jax.random.key(0), num_samples=64, temperature=0.07)
    assert float(aligned) < 0.1 < np.log(64) * 0.5 < float(shifted)


def test_patchnce_errors():
    a = [jnp.zeros((4, 4, 2))]
    with pytest.raises(ValueError, match="one length"):
        L.patchnce(a, a + a, jax.random.key(0))
    with pytest.raises(ValueError, match="differ"):
        L.patchnce(a, [jnp.zeros((4, 4, 3))], jax.random.key(0))
    with pytest.raises(ValueError, match="projections"):
        L.patchnce(a, a, jax.random.key(0), projections=[])


def test_deepsim_of_an_image_with_itself_is_one_and_its_gradient_vanishes():
    rng = np.random.default_rng(4)
    layers = [jnp.asarray(rng.normal(size=(16, 12, 4))), jnp.asarray(rng.normal(size=(8, 6, 8)))]
    np.testing.assert_allclose(float(L.deepsim(layers, layers)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(L.deepsim(layers, [-x for x in layers])), -1.0, rtol=1e-6)
    g = jax.grad(lambda ls: L.deepsim(layers, ls))(layers)
    assert max(float(jnp.abs(x).max()) for x in g) < 1e-6  # the maximum
    other = [jnp.roll(x, 1, axis=0) for x in layers]
    assert float(L.deepsim(layers, other)) < 0.5


def test_deepsim_equals_eq5_by_hand_and_masks():
    rng = np.random.default_rng(5)
    a1, b1 = rng.normal(size=(4, 4, 3)), rng.normal(size=(4, 4, 3))
    a2, b2 = rng.normal(size=(2, 2, 2)), rng.normal(size=(2, 2, 2))
    cos = lambda a, b: np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)  # noqa: E731
    want = 0.5 * (cos(a1, b1).mean() + cos(a2, b2).mean())
    got = L.deepsim([jnp.asarray(a1), jnp.asarray(a2)], [jnp.asarray(b1), jnp.asarray(b2)])
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    mask = np.zeros((4, 4), np.float32)
    mask[:2] = 1
    got = L.deepsim([jnp.asarray(a1)], [jnp.asarray(b1)], mask=jnp.asarray(mask))
    np.testing.assert_allclose(float(got), cos(a1, b1)[:2].mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="one length"):
        L.deepsim([jnp.asarray(a1)], [])
