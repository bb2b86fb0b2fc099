"""VoxelMorph baseline: lambda semantics, registration shapes, errors, gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg.methods import voxelmorph as V

SMALL = dict(ndim=2, enc_features=(4, 8), dec_features=(8, 8), final_features=(8,))


def _batch(b=2, shape=(32, 32)):
    x = jax.random.uniform(jax.random.key(0), (b, *shape, 1))
    return {"fixed": x, "moving": jnp.roll(x, 2, axis=1)}


@pytest.mark.parametrize("lam, which", [(0.0, "similarity"), (1.0, "smoothness")])
def test_lambda_zero_is_similarity_and_one_is_regularisation(lam, which):
    cfg = V.Config(**SMALL, hyper=True, lambda_range=(lam, lam), reg_scale=3.0)
    model = V.init(jax.random.key(0), cfg)
    # Perturb the flow so the regulariser is not ~0.
    model.net.flow.kernel.value = model.net.flow.kernel.value + 0.05
    loss, aux = V.loss_fn(model, _batch(), key=jax.random.key(1))
    expected = aux[which] * (3.0 if which == "smoothness" else 1.0)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    assert float(aux["smoothness"]) > 0


def test_unconditioned_loss_adds_weighted_smoothness():
    cfg = V.Config(**SMALL, reg_weight=2.0, similarity="mse")
    model = V.init(jax.random.key(0), cfg)
    model.net.flow.kernel.value = model.net.flow.kernel.value + 0.05
    loss, aux = V.loss_fn(model, _batch(), key=jax.random.key(1))
    np.testing.assert_allclose(float(loss), float(aux["similarity"] + 2.0 * aux["smoothness"]), rtol=1e-5)
    assert aux["lam"] is None


@pytest.mark.parametrize("bidirectional", [False, True])
def test_similarity_compares_with_fixed_target_when_given(bidirectional):
    cfg = V.Config(**SMALL, reg_weight=0.0, similarity="mse", bidirectional=bidirectional)
    model = V.init(jax.random.key(0), cfg)  # ~identity transform at init
    batch = _batch()
    _, aux = V.loss_fn(model, batch, key=jax.random.key(1))
    assert float(aux["similarity"]) > 1e-3  # fixed and moving differ by a shift
    # With the moving image itself as the loss target the (near-identity) warp matches it exactly,
    # though the network still sees the shifted fixed image.
    _, aux_t = V.loss_fn(model, dict(batch, fixed_target=batch["moving"]), key=jax.random.key(1))
    assert float(aux_t["similarity"]) < 1e-6
    with pytest.raises(ValueError, match="fixed_target"):
        V.loss_fn(model, dict(batch, fixed_target=batch["moving"][:, :16]), key=jax.random.key(1))


def _identity_model(cfg):
    """A model whose flow conv is zero: exactly the identity transform."""
    model = V.init(jax.random.key(0), cfg)
    model.net.flow.kernel.value = jnp.zeros_like(model.net.flow.kernel.value)
    return model


def test_loss_sigma_smooths_target_and_moving_before_the_similarity():
    from jaxreg import losses as L
    from jaxreg.optimize import gaussian_blur
    cfg = V.Config(**SMALL, reg_weight=0.0, similarity="mse", loss_sigma=1.5)
    model = _identity_model(cfg)
    batch = _batch()
    _, aux = V.loss_fn(model, batch, key=jax.random.key(1))
    blur = jax.vmap(lambda x: gaussian_blur(x, 1.5))
    expected = jnp.mean(jax.vmap(L.mse)(blur(batch["fixed"]), blur(batch["moving"])))
    np.testing.assert_allclose(float(aux["similarity"]), float(expected), rtol=1e-5)
    unsmoothed = jnp.mean(jax.vmap(L.mse)(batch["fixed"], batch["moving"]))
    assert float(expected) < 0.5 * float(unsmoothed)  # the smoothing really acts
    with pytest.raises(ValueError, match="loss_sigma"):
        V.Config(**SMALL, loss_sigma=-1.0)


def test_loss_mask_threshold_restricts_the_similarity_to_the_target_foreground():
    from jaxreg import losses as L
    cfg = V.Config(**SMALL, reg_weight=0.0, similarity="mse", loss_mask_threshold=0.5)
    model = _identity_model(cfg)
    batch = _batch()
    _, aux = V.loss_fn(model, batch, key=jax.random.key(1))
    f, m = batch["fixed"], batch["moving"]
    expected = jnp.mean(jax.vmap(lambda a, b: L.mse(a, b, mask=(a[..., 0] > 0.5).astype(a.dtype)))(f, m))
    np.testing.assert_allclose(float(aux["similarity"]), float(expected), rtol=1e-5)
    # Differences only in the background do not count.
    bg = batch["fixed"] <= 0.5
    batch2 = {"fixed": f, "moving": jnp.where(bg, 0.0, f)}
    _, aux2 = V.loss_fn(model, batch2, key=jax.random.key(1))
    assert float(aux2["similarity"]) < 1e-10


def test_multiscale_similarity_averages_downsampled_levels():
    cfg1 = V.Config(**SMALL, similarity="mse")
    cfg3 = V.Config(**SMALL, similarity="mse", loss_scales=3)
    x = jax.random.uniform(jax.random.key(0), (32, 32, 1))
    y = jnp.roll(x, 3, axis=0)
    down = lambda a, n: jax.image.resize(a, (n, n, 1), "linear")
    expected = (V.similarity(cfg1, x, y) + V.similarity(cfg1, down(x, 16), down(y, 16))
                + V.similarity(cfg1, down(down(x, 16), 8), down(down(y, 16), 8))) / 3
    np.testing.assert_allclose(float(V.multiscale_similarity(cfg3, x, y)), float(expected), rtol=1e-5)
    # A level below 8 voxels is skipped: 16x16 input gives levels 16 and 8 only.
    x16, y16 = x[:16, :16], y[:16, :16]
    expected2 = (V.similarity(cfg1, x16, y16) + V.similarity(cfg1, down(x16, 8), down(y16, 8))) / 2
    np.testing.assert_allclose(float(V.multiscale_similarity(cfg3, x16, y16)), float(expected2), rtol=1e-5)
    assert float(V.multiscale_similarity(cfg3, x, x)) == 0.0
    with pytest.raises(ValueError, match="loss_scales"):
        V.Config(**SMALL, loss_scales=0)


@pytest.mark.parametrize("similarity", V.SIMILARITIES)
def test_every_similarity_has_finite_gradients(similarity):
    from flax import nnx

    cfg = V.Config(**SMALL, similarity=similarity)
    model = V.init(jax.random.key(0), cfg)
    graphdef, params = nnx.split(model)
    grads = jax.grad(lambda p: V.loss_fn(nnx.merge(graphdef, p), _batch(), key=jax.random.key(0))[0])(params)
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0


def test_register_shapes_and_errors():
    model = V.init(jax.random.key(0), V.Config(**SMALL))
    b = _batch()
    r = V.register(model, b["fixed"][0], b["moving"][0])
    assert r.disp.shape == (32, 32, 2) and r.warped.shape == (32, 32, 1) and r.inverse_disp.shape == (32, 32, 2)
    rb = V.register(model, b["fixed"], b["moving"])
    assert rb.disp.shape == (2, 32, 32, 2)
    with pytest.raises(ValueError, match="not lambda-conditioned"):
        V.register(model, b["fixed"], b["moving"], lam=0.3)
    hyper = V.init(jax.random.key(0), V.Config(**SMALL, hyper=True))
    with pytest.raises(ValueError, match="pass lam"):
        V.register(hyper, b["fixed"], b["moving"])
    with pytest.raises(ValueError, match="differ"):
        V.loss_fn(model, {"fixed": b["fixed"], "moving": b["moving"][..., :1, :]}, key=jax.random.key(0))


@pytest.mark.parametrize("kw, match", [(dict(ndim=4), "ndim"), (dict(similarity="ssd"), "similarity"),
                                       (dict(lambda_range=(0.5, 0.2)), "lambda_range"),
                                       (dict(reg_weight=-1.0), "reg_weight")])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        V.Config(**kw)


def test_mind_input_features_are_contrast_invariant():
    """With input_features="mind" the network sees MIND-SSC descriptors, which do not change under a
    positive affine intensity map, so the predicted velocity does not either; intensity inputs do."""
    batch = _batch(shape=(32, 32))
    fixed, moving = batch["fixed"], batch["moving"]
    remapped = 2.5 * fixed + 0.3
    for features, invariant in (("mind", True), ("image", False)):
        cfg = V.Config(**SMALL, input_features=features)
        model = V.init(jax.random.key(0), cfg)
        v1, _, _ = model(fixed, moving)
        v2, _, _ = model(remapped, moving)
        diff = float(jnp.max(jnp.abs(v1 - v2)))
        scale = float(jnp.max(jnp.abs(v1)))
        assert scale > 0
        assert (diff < 1e-4 * scale) == invariant, (features, diff, scale)
    # The loss and register work on images either way (descriptors are internal).
    model = V.init(jax.random.key(0), V.Config(**SMALL, input_features="mind"))
    loss, _ = V.loss_fn(model, batch, key=jax.random.key(1))
    assert np.isfinite(float(loss))
    assert V.register(model, fixed[0], moving[0]).warped.shape == fixed[0].shape
    with pytest.raises(ValueError, match="input_features"):
        V.Config(**SMALL, input_features="mind_ssc")


def test_supervised_loss_is_the_foreground_mean_squared_endpoint_error():
    cfg = V.Config(**SMALL, reg_weight=0.0, supervised=True)
    model = V.init(jax.random.key(0), cfg)
    model.net.flow.kernel[...] = model.net.flow.kernel[...] + 0.05
    batch = _batch()
    batch["fixed"] = batch["fixed"].at[:, :8].set(0.0)  # background rows: not scored
    disp = V.register(model, batch["fixed"], batch["moving"]).disp
    truth = jnp.zeros_like(disp).at[..., 0].set(1.5)
    loss, aux = V.loss_fn(model, {**batch, "disp_true": truth}, key=jax.random.key(1))
    fg = np.asarray(batch["fixed"][..., 0] > 0.05)
    err = np.sum((np.asarray(disp) - np.asarray(truth)) ** 2, -1)
    expected = np.mean([err[b][fg[b]].mean() for b in range(err.shape[0])])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
    # the network's own field as the truth: zero loss
    assert float(V.loss_fn(model, {**batch, "disp_true": disp}, key=jax.random.key(1))[0]) < 1e-10
    with pytest.raises(ValueError, match="disp_true"):
        V.loss_fn(model, batch, key=jax.random.key(1))
