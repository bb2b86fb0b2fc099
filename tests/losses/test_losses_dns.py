"""DNS self-similarity (eq. 1) against a direct loop, the fused squeeze, the cosine loss, InfoNCE and its sampler."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxreg import losses as L
from jaxreg.losses.dns import dns_reference, dns_squeezed


@pytest.mark.parametrize("shape,k", [((6, 7, 5, 2), 24), ((7, 6, 3), 8)])
def test_dns_matches_direct_loop(shape, k):
    h = jax.random.normal(jax.random.key(0), shape)
    out = np.asarray(L.dns(h))
    assert out.shape == shape + (k,)
    np.testing.assert_allclose(out, dns_reference(np.asarray(h)), rtol=2e-5, atol=2e-6)
    single = np.asarray(L.dns(h, dilations=(1,)))
    np.testing.assert_allclose(single, out[..., : k // 2], rtol=1e-6)


def test_dns_pairs_are_at_sqrt2_times_dilation():
    for ndim, n in ((3, 12), (2, 4)):
        pairs = L.dns_pairs(ndim, (1, 2))
        assert len(pairs) == 2 * n
        for i, (a, b) in enumerate(pairs):
            dil = 1 if i < n else 2
            assert sum((x - y) ** 2 for x, y in zip(a, b)) == 2 * dil**2
            assert sum(x * x for x in a) == dil**2 and sum(x * x for x in b) == dil**2
        assert len(set(pairs)) == 2 * n


def test_dns_invariant_to_affine_feature_maps_and_constant_safe():
    h = jax.random.normal(jax.random.key(1), (8, 8, 6, 3))
    np.testing.assert_allclose(np.asarray(L.dns(-2.5 * h + 4.0)), np.asarray(L.dns(h)), rtol=1e-4, atol=1e-5)
    const = L.dns(jnp.ones((5, 5, 5, 2)))
    np.testing.assert_allclose(np.asarray(const), 1.0)
    g = jax.grad(lambda x: jnp.sum(L.dns(x)))(jnp.ones((5, 5, 5, 2)))
    assert np.all(np.isfinite(np.asarray(g)))
    with pytest.raises(ValueError, match="spatial"):
        L.dns(jnp.ones((4, 4)))
    with pytest.raises(ValueError, match="dilations"):
        L.dns(h, dilations=(0,))


def test_fused_squeeze_equals_linear_over_channels():
    h = jax.random.normal(jax.random.key(2), (9, 8, 7, 4))
    w = jnp.asarray([0.3, -1.2, 0.5, 2.0])
    ref = jnp.einsum("...ck,c->...k", L.dns(h), w) + 0.7
    np.testing.assert_allclose(np.asarray(dns_squeezed(h, w, 0.7)), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_cosine_similarity_loss():
    a = jax.random.normal(jax.random.key(3), (6, 5, 4, 7))
    assert float(L.cosine_similarity_loss(a, a)) == pytest.approx(-1.0, abs=1e-6)
    assert float(L.cosine_similarity_loss(a, -a)) == pytest.approx(1.0, abs=1e-6)
    assert float(L.cosine_similarity_loss(a, 3.0 * a)) == pytest.approx(-1.0, abs=1e-6)
    z = jnp.zeros_like(a)
    assert float(L.cosine_similarity_loss(a, z)) == 0.0
    assert np.all(np.isfinite(np.asarray(jax.grad(lambda m: L.cosine_similarity_loss(a, m))(z))))
    mask = jnp.zeros(a.shape[:-1]).at[:3].set(1.0)
    b = a.at[3:].set(-a[3:])
    assert float(L.cosine_similarity_loss(a, b, mask=mask)) == pytest.approx(-1.0, abs=1e-6)
    check_grads(lambda m: L.cosine_similarity_loss(a[:2, :2, :2], m), (a[:2, :2, :2] + 0.3,), order=1,
                modes=["rev"], atol=1e-2, rtol=1e-2)


def test_infonce_hand_computed():
    q = jnp.asarray([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    k = jnp.asarray([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    tau = 0.5
    qn = np.asarray(q) / np.linalg.norm(q, axis=1, keepdims=True)
    kn = np.asarray(k) / np.linalg.norm(k, axis=1, keepdims=True)
    s = qn @ kn.T / tau
    ref = np.mean([-s[i, i] + np.log(np.exp(s[i]).sum()) for i in range(3)])
    assert float(L.infonce(q, k, temperature=tau)) == pytest.approx(ref, rel=1e-6)
    w = jnp.asarray([1.0, 1.0, 0.0])
    ref_w = np.mean([-s[i, i] + np.log(np.exp(s[i, :2]).sum()) for i in range(2)])
    assert float(L.infonce(q, k, temperature=tau, weights=w)) == pytest.approx(ref_w, rel=1e-6)
    # identical vectors: log N; perfectly matched orthogonal codes: ~0
    same = jnp.ones((5, 3))
    assert float(L.infonce(same, same)) == pytest.approx(np.log(5), rel=1e-6)
    eye = jnp.eye(4)
    assert float(L.infonce(eye, eye)) < 1e-5
    g = jax.grad(lambda x: L.infonce(x, k))(q)
    assert np.all(np.isfinite(np.asarray(g)))
    with pytest.raises(ValueError, match="shape"):
        L.infonce(q, k[:2])


def test_sample_in_mask_never_leaves_mask_and_is_keyed():
    mask = jnp.zeros((10, 12, 8), bool).at[2:5, 3:9, 1:4].set(True)  # 54 voxels
    f = jax.jit(lambda k: L.sample_in_mask(k, mask, 50))
    pts, w = f(jax.random.key(0))
    assert pts.shape == (50, 3) and pts.dtype == jnp.int32
    assert np.all(np.asarray(w) == 1.0)
    assert np.all(np.asarray(mask)[tuple(np.asarray(pts).T)])
    assert len({tuple(p) for p in np.asarray(pts)}) == 50  # without replacement
    np.testing.assert_array_equal(np.asarray(f(jax.random.key(0))[0]), np.asarray(pts))
    assert not np.array_equal(np.asarray(f(jax.random.key(1))[0]), np.asarray(pts))
    pts, w = L.sample_in_mask(jax.random.key(2), mask, 60)  # more than the mask holds
    w = np.asarray(w)
    assert w.sum() == 54 and np.all(np.asarray(mask)[tuple(np.asarray(pts)[w > 0].T)])
    with pytest.raises(ValueError, match="num"):
        L.sample_in_mask(jax.random.key(0), mask, 0)
