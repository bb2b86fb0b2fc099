"""Global Parzen MI and NMI: NumPy oracle, closed forms, symmetry, invariances."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg.losses import mutual_information, nmi


def entropies_reference(f, m, w, bins=32, sigma_ratio=0.5):
    """H(F), H(M), H(F, M) in float64 from the documented recipe."""
    w = np.asarray(w, np.float64).reshape(-1)
    centres = np.linspace(0.0, 1.0, bins)
    sigma = sigma_ratio / (bins - 1)

    def soft(x):
        x = np.asarray(x, np.float64).reshape(-1)
        lo, hi = x[w > 0].min(), x[w > 0].max()
        x = np.clip((x - lo) / (hi - lo), 0, 1)
        a = np.exp(-0.5 * ((x[:, None] - centres) / sigma) ** 2)
        return a / a.sum(1, keepdims=True)

    p = (soft(f) * w[:, None]).T @ soft(m) / w.sum()

    def h(q):
        q = q[q > 0]
        return -np.sum(q * np.log(q))

    return h(p.sum(1)), h(p.sum(0)), h(p)


def test_matches_numpy_oracle_with_mask(spatial, make_image, evaluator):
    f, m = make_image(0, spatial), make_image(1, spatial)
    m = m**2  # a non-trivial intensity relation
    w = np.ones(spatial, np.float32)
    w[: spatial[0] // 3] = 0
    w[-1] = 0.5
    pairs = [(f, m), (f, m, w)]
    mi = evaluator(mutual_information).values(pairs)
    nm = evaluator(nmi).values(pairs)
    for i, weights in enumerate([np.ones(spatial), w]):
        h_f, h_m, h_fm = entropies_reference(f, m, weights)
        np.testing.assert_allclose(mi[i], -(h_f + h_m - h_fm), rtol=1e-4)
        np.testing.assert_allclose(nm[i], -(h_f + h_m) / h_fm, rtol=1e-5)


def test_symmetry_invariances_and_self_information(spatial, make_image, evaluator):
    f, m = make_image(0, spatial), make_image(1, spatial)
    values = evaluator(mutual_information).values([
        (f, m), (m, f), (f, 3.0 * m - 1.0), (f, -2.0 * m + 5.0), (f, f), (f, np.exp(3.0 * f)),
        (f, np.roll(f, 3, 0)),
    ])
    mi_fm, mi_mf, affine_pos, affine_neg, self_mi, remapped, shifted = values
    np.testing.assert_allclose(mi_mf, mi_fm, rtol=1e-5)
    # min-max normalisation makes affine maps exact (a < 0 mirrors the bins)
    np.testing.assert_allclose([affine_pos, affine_neg], mi_fm, rtol=1e-4)
    # MI(x, x) = 2 H(F) - H(F, F) is below H(x): the kernel (sigma = half a
    # bin) spreads each voxel over ~3 bins, adding ~1 nat to H(F, F); the
    # narrow-kernel test below gets MI(x, x) = H(x) exactly.
    h_f, _, _ = entropies_reference(f, f, np.ones(spatial))
    assert 0.6 * h_f < -self_mi < h_f
    # a nonlinear monotone remap keeps most of it; a translation does not
    assert -remapped > 0.8 * -self_mi
    assert -shifted < 0.6 * -remapped
    assert all(v <= 0 for v in values)


def test_closed_forms_with_narrow_kernel():
    # 4 intensity levels sitting on bin centres, sharp kernel: hard binning.
    base = np.tile(np.arange(4), (24, 5))[..., None].astype(np.float32)  # (24, 20, 1)
    other = np.repeat(np.arange(4), 6)[:, None, None] * np.ones((24, 20, 1), np.float32)
    # `other` is constant along axis 1 where `base` cycles: independent.
    mi = jax.jit(functools.partial(mutual_information, bins=4, sigma_ratio=0.1))
    nm = jax.jit(functools.partial(nmi, bins=4, sigma_ratio=0.1))
    np.testing.assert_allclose(float(mi(base, base)), -np.log(4), rtol=1e-5)
    np.testing.assert_allclose(float(mi(base, 3.0 - base)), -np.log(4), rtol=1e-5)
    np.testing.assert_allclose(float(mi(base, other)), 0.0, atol=1e-6)
    np.testing.assert_allclose(float(nm(base, base)), -2.0, rtol=1e-5)
    np.testing.assert_allclose(float(nm(base, other)), -1.0, rtol=1e-5)


def test_nmi_range(spatial, make_image, evaluator):
    f = make_image(0, spatial)
    pairs = [(f, f), (f, make_image(1, spatial)), (f, np.roll(f, 3, 0)), (f, np.full_like(f, 2.0))]
    values = evaluator(nmi).values(pairs)
    assert np.all((values >= -2.0) & (values <= -1.0)), values
    assert values[0] < values[2] < values[1] + 0.05


def test_channels_are_averaged(make_image):
    spatial = (16, 12)
    f = np.concatenate([make_image(0, spatial), make_image(1, spatial)], -1)
    m = np.concatenate([make_image(2, spatial), make_image(1, spatial) ** 3], -1)
    per_channel = []
    for c in range(2):
        h_f, h_m, h_fm = entropies_reference(f[..., c], m[..., c], np.ones(spatial))
        per_channel.append(-(h_f + h_m - h_fm))
    value = float(jax.jit(mutual_information)(f, m))
    np.testing.assert_allclose(value, np.mean(per_channel), rtol=1e-4)


def test_bad_options_raise():
    img = jnp.zeros((8, 8, 1))
    for bad in (1, 16.0):
        with pytest.raises(ValueError, match="bins"):
            mutual_information(img, img, bins=bad)
    with pytest.raises(ValueError, match="sigma_ratio"):
        nmi(img, img, sigma_ratio=0.0)


# ----------------------------------------------------------------------------- cubic B-spline Parzen window


def _bspline3(t):
    t = np.abs(t)
    return np.where(t < 1, 2 / 3 - t**2 + t**3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def test_bspline_weights_partition_of_unity_and_support():
    from jaxreg.losses import parzen_weights

    x = np.concatenate([np.linspace(0, 1, 257), [0.0, 1.0, 0.5]]).astype(np.float32)
    a = np.asarray(parzen_weights(x, bins=32, kernel="bspline"))
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-6)
    assert a.min() >= -1e-7 and np.all((a > 1e-7).sum(-1) <= 4)
    ref = _bspline3(1 + x[:, None] * 29 - np.arange(32))  # the documented recipe
    np.testing.assert_allclose(a, ref, atol=1e-6)
    with pytest.raises(ValueError, match="bins >= 4"):
        parzen_weights(x, bins=3)
    with pytest.raises(ValueError, match="kernel"):
        parzen_weights(x, kernel="box")


def test_bspline_mi_matches_a_numpy_oracle_and_prefers_alignment():
    rng = np.random.default_rng(0)
    f = rng.random((20, 18, 1)).astype(np.float32)
    m = (1 - f) ** 2
    a_f = _bspline3(1 + (f.ravel() - f.min()) / np.ptp(f) * 29 - np.arange(32)[None].T).T
    mm = (m.ravel() - m.min()) / np.ptp(m)
    a_m = _bspline3(1 + mm * 29 - np.arange(32)[None].T).T
    p = a_f.T @ a_m / f.size
    h = lambda q: -np.sum(q[q > 0] * np.log(q[q > 0]))  # noqa: E731
    ref = -(h(p.sum(1)) + h(p.sum(0)) - h(p))
    got = float(mutual_information(jnp.asarray(f), jnp.asarray(m), kernel="bspline"))
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    shuffled = rng.permutation(m.ravel()).reshape(m.shape)
    assert got < float(mutual_information(jnp.asarray(f), jnp.asarray(shuffled), kernel="bspline"))


def test_mi_of_samples_equals_mutual_information_on_unit_range_samples():
    from jaxreg.losses import mi_of_samples, parzen_weights

    rng = np.random.default_rng(1)
    f = np.concatenate([[0.0, 1.0], rng.random(500)]).astype(np.float32)
    m = np.concatenate([[1.0, 0.0], rng.random(500)]).astype(np.float32) * 0.5 + 0.5 * (1 - f)
    m = (m - m.min()) / np.ptp(m)
    w = np.ones_like(f)
    for kernel, normalized in (("bspline", False), ("gaussian", False), ("bspline", True)):
        got = mi_of_samples(parzen_weights(f, kernel=kernel), jnp.asarray(m), jnp.asarray(w), kernel=kernel,
                            normalized=normalized)
        ref = mutual_information(jnp.asarray(f)[:, None, None], jnp.asarray(m)[:, None, None], kernel=kernel,
                                 normalized=normalized)
        np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)


def test_mi_of_sample_groups_pools_each_owners_groups():
    from jaxreg.losses import mi_of_sample_groups, mi_of_samples, parzen_weights

    rng = np.random.default_rng(2)
    f, m = rng.random((4, 300)).astype(np.float32), rng.random((4, 300)).astype(np.float32)
    m[1] = 0.7 * f[1] + 0.3 * m[1]  # groups that differ in dependence
    w = (rng.random((4, 300)) > 0.2).astype(np.float32)
    owner = np.array([0, 2, 0, 1])
    for kernel, normalized in (("bspline", False), ("gaussian", True)):
        a_f = parzen_weights(jnp.asarray(f), bins=16, kernel=kernel)
        got = mi_of_sample_groups(a_f, jnp.asarray(m), jnp.asarray(w), jnp.asarray(owner), 4, kernel=kernel,
                                  normalized=normalized)
        for k, groups in enumerate(([0, 2], [3], [1])):
            want = mi_of_samples(a_f[np.asarray(groups)].reshape(-1, 16), jnp.asarray(m[groups]).ravel(),
                                 jnp.asarray(w[groups]).ravel(), kernel=kernel, normalized=normalized)
            np.testing.assert_allclose(float(got[k]), float(want), rtol=1e-5)
        assert float(got[3]) == 0.0  # an owner without groups
