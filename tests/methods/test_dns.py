"""DNS / MASR-Net: network shapes 2D/3D, BlurPool, contrastive loss, validation, IO-DNS, shipped-weights I/O."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreg import losses as L
from jaxreg.methods import dns as D
from jaxreg.methods import restore_model
from jaxreg.nn import MASRNet, blur_pool
from jaxreg.optimize import DNS_CONFIG, InstanceConfig, register_instance

SMALL = dict(enc_features=(4, 4, 8, 8), dec_features=(8, 4, 4), num_samples=256)


@pytest.mark.parametrize("ndim,shape,k", [(2, (20, 18), 8), (3, (12, 10, 9), 24)])
def test_masr_shapes(ndim, shape, k):
    net = MASRNet(ndim, enc_features=(4, 4, 8, 8), dec_features=(8, 4, 4), rngs=nnx.Rngs(0))
    assert net.num_pairs == k
    out = net(jnp.ones((2, *shape, 1)))
    assert out.shape == (2, *shape, 24)
    assert net.features(jnp.ones((1, *shape, 1))).shape == (1, *shape, 4)
    single = MASRNet(ndim, enc_features=(4, 4, 8, 8), dec_features=(8, 4, 4), dilations=(1,), rngs=nnx.Rngs(0))
    assert single.num_pairs == k // 2 and single(jnp.ones((1, *shape, 1))).shape == (1, *shape, 24)
    plain = MASRNet(ndim, enc_features=(4, 4, 8, 8), dec_features=(8, 4, 4), use_dns=False, rngs=nnx.Rngs(0))
    assert plain(jnp.ones((1, *shape, 1))).shape == (1, *shape, 24)
    with pytest.raises(ValueError, match="expects"):
        net(jnp.ones((2, *shape, 2)))


def test_blur_pool_is_binomial_blur_then_stride():
    x = jax.random.normal(jax.random.key(0), (1, 9, 8, 2))
    out = blur_pool(x, 2)
    assert out.shape == (1, 5, 4, 2)
    xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    k = np.array([0.25, 0.5, 0.25])
    ref = sum(k[i] * k[j] * xp[:, i:i + 9, j:j + 8] for i in range(3) for j in range(3))[:, ::2, ::2]
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(blur_pool(jnp.ones((1, 7, 6, 5, 1)), 3)), 1.0, rtol=1e-6)


def _views(shape=(24, 24), seed=0):
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), -1)
    img = (np.sum(g**2, -1) < 0.7).astype(np.float32) * (0.5 + 0.5 * np.sin(4 * g[..., 0]) ** 2)
    img = img[None, ..., None]
    return {"fixed": jnp.asarray(img), "moving": jnp.asarray(1.0 - img) * (img > 0), "same": jnp.zeros((1,))}


def test_loss_fn_finite_gradients_and_training_lowers_it():
    cfg = D.Config(ndim=2, **SMALL)
    model = D.init(jax.random.key(0), cfg)
    batch = _views()
    loss, aux = D.loss_fn(model, batch, key=jax.random.key(1))
    assert np.isfinite(float(loss)) and 0.0 <= float(aux["top1"]) <= 1.0
    assert float(loss) <= np.log(cfg.num_samples) + 1.0
    graphdef, params = nnx.split(model)

    @jax.jit
    def step(params, opt_state, key):
        def f(p):
            return D.loss_fn(nnx.merge(graphdef, p), batch, key=key)[0]

        value, g = jax.value_and_grad(f)(params)
        upd, opt_state = tx.update(g, opt_state)
        return jax.tree.map(lambda a, b: a + b, params, upd), opt_state, value, g

    import optax

    tx = optax.adam(3e-3)
    opt_state = tx.init(params)
    first = None
    for i in range(40):
        params, opt_state, value, g = step(params, opt_state, jax.random.key(100))  # fixed key: same samples
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(g))
        first = float(value) if first is None else first
    assert float(value) < first - 0.5


def test_same_views_are_always_augmented():
    cfg = D.Config(ndim=2, **SMALL, bezier_views=0.0)
    model = D.init(jax.random.key(0), cfg)
    b = _views()
    same = {"fixed": b["fixed"], "moving": b["fixed"], "same": jnp.ones((1,))}
    untouched = {"fixed": b["fixed"], "moving": b["fixed"], "same": jnp.zeros((1,))}
    l_same = float(D.loss_fn(model, same, key=jax.random.key(3))[0])
    l_plain = float(D.loss_fn(model, untouched, key=jax.random.key(3))[0])
    assert l_same != pytest.approx(l_plain)  # the second copy was remapped


def test_descriptors_validate_and_errors():
    cfg = D.Config(ndim=2, **SMALL)
    model = D.init(jax.random.key(0), cfg)
    img = _views()["fixed"][0]
    d = D.descriptors(model, img)
    assert d.shape == img.shape[:-1] + (24,) and d.dtype == jnp.float32
    with pytest.raises(ValueError, match="expects"):
        D.descriptors(model, img[..., 0])
    img = np.asarray(img)
    res = D.validate(model, [{"fixed": img, "moving": img, "name": "self"},
                             {"fixed": img, "moving": np.roll(img, 5, axis=0), "name": "rolled"}], num_samples=64)
    by = {r["name"]: r for r in res["val_pairs"]}
    assert by["self"]["infonce"] < by["rolled"]["infonce"]  # positives are exact only for the aligned pair
    assert res["val_infonce"] == pytest.approx((by["self"]["infonce"] + by["rolled"]["infonce"]) / 2)


def test_io_dns_recovers_a_shift_with_a_feature_fn():
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in (32, 32, 24)], indexing="ij"), -1)
    blob = lambda c: np.exp(-np.sum((g - np.asarray(c)) ** 2, -1) / (2 * 4.0**2))
    fixed = blob((16, 16, 12)) + 0.6 * blob((10, 20, 14))
    moving = blob((17.5, 16, 12)) + 0.6 * blob((11.5, 20, 14))  # moving = fixed shifted by +1.5 along axis 0
    fixed, moving = jnp.asarray(fixed)[..., None], jnp.asarray(1.0 - moving)[..., None]  # inverted contrast
    feat = lambda im: L.mind_ssc(im, radius=1, dilation=1)  # any contrast-invariant feature function plugs in
    cfg = InstanceConfig(similarity="dns", affine=False, levels=2, iterations=(60, 40), learning_rates=(1e-2, 5e-3),
                         smoothness=(0.5, 0.4), num_samples=0)
    res = register_instance(fixed, moving, config=cfg, feature_fn=feat)
    u0 = float(np.mean(np.asarray(res.total_disp)[8:24, 8:24, 6:18, 0]))
    assert u0 == pytest.approx(1.5, abs=0.35)
    with pytest.raises(ValueError, match="feature_fn"):
        register_instance(fixed, moving, config=DNS_CONFIG)
    with pytest.raises(ValueError, match="affine stage"):
        InstanceConfig(similarity="dns", affine_similarity=None)


def _blob_pair():
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in (32, 32, 24)], indexing="ij"), -1)
    blob = lambda c: np.exp(-np.sum((g - np.asarray(c)) ** 2, -1) / (2 * 4.0**2))
    return (jnp.asarray(blob((16, 16, 12)) + 0.6 * blob((10, 20, 14)))[..., None],
            jnp.asarray(blob((17, 15, 12)) + 0.6 * blob((11, 19, 14)))[..., None])


def test_io_dns_fixed_descriptors_in_a_thread_equal_the_serial_result(monkeypatch):
    """The fixed descriptors are computed in a thread during the affine stage: same result as in line."""
    import threading

    import jaxreg.optimize.instance as I

    fixed, moving = _blob_pair()
    calls = []

    def feat(im):
        calls.append(threading.current_thread() is threading.main_thread())
        return L.mind_ssc(im, radius=1, dilation=1)

    cfg = InstanceConfig(similarity="dns", levels=2, affine_levels=2, affine_iterations=(10, 10),
                         iterations=(20, 10), learning_rates=(1e-2, 5e-3), smoothness=(0.5, 0.4), num_samples=0)
    threaded = register_instance(fixed, moving, config=cfg, feature_fn=feat)
    assert calls == [False, True]  # fixed in the background thread, moving after the affine stage

    class Inline:  # the same work, without a thread
        def __init__(self, fn):
            self.value = fn()

        def result(self):
            return self.value

    monkeypatch.setattr(I, "_in_background", lambda fn, device: Inline(fn))
    serial = register_instance(fixed, moving, config=cfg, feature_fn=feat)
    np.testing.assert_array_equal(np.asarray(threaded.total_disp), np.asarray(serial.total_disp))
    np.testing.assert_array_equal(threaded.matrix, serial.matrix)


def test_io_dns_error_in_the_fixed_descriptors_reaches_the_caller():
    fixed, moving = _blob_pair()

    def feat(im):  # fails only for the fixed image, in the background thread
        import threading

        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("feature network failed")
        return L.mind_ssc(im, radius=1, dilation=1)

    cfg = InstanceConfig(similarity="dns", levels=2, affine_levels=2, affine_iterations=(5, 5), iterations=(5, 5),
                         learning_rates=(1e-2, 5e-3), smoothness=(0.5, 0.4), num_samples=0)
    with pytest.raises(RuntimeError, match="feature network failed"):
        register_instance(fixed, moving, config=cfg, feature_fn=feat)


def test_weights_roundtrip_and_errors(tmp_path):
    from jaxreg.weights import load_model, read_weights, save_weights

    cfg = D.Config(ndim=2, **SMALL)
    model = D.init(jax.random.key(0), cfg)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    import dataclasses

    meta = {"method": "dns", "model": {k: (list(v) if isinstance(v, tuple) else v)
                                       for k, v in dataclasses.asdict(cfg).items()}}
    st, js = save_weights(tmp_path / "w", meta, params)
    _, loaded, _ = load_model(str(st), method="dns")
    img = _views()["fixed"][0]
    np.testing.assert_allclose(np.asarray(D.descriptors(loaded, img)), np.asarray(D.descriptors(model, img)),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="not 'voxelmorph'"):
        load_model(str(st), method="voxelmorph")
    bad = dict(meta, model=dict(meta["model"], enc_features=[8, 8, 8, 8]))
    js.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="do not match"):
        load_model(str(st))
    with pytest.raises(FileNotFoundError):
        read_weights(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "junk.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="safetensors"):
        read_weights(tmp_path / "junk.safetensors")
