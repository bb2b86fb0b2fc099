"""ContraReg: loss and gradients (frozen autoencoders get none), per-contrast extractors, lambda objective,
pretrained features from a run directory, restore and register; DeepSim and the feature pretraining likewise."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreg.methods import contrareg as CR
from jaxreg.methods import deepsim as DS
from jaxreg.methods import features as FE
from jaxreg.methods import restore_model

NET = dict(enc_features=(4, 8, 8, 8), dec_features=(8, 8, 8, 8), final_features=(8, 4))


def _pair(shape=(32, 48), b=2, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    f = jax.random.uniform(k1, (b, *shape, 1))
    return f, jnp.roll(f, 2, axis=1) * 0.8 + 0.1 * jax.random.uniform(k2, (b, *shape, 1))


def _grads(mod, model, batch):
    gd, st = nnx.split(model)
    (loss, aux), g = jax.value_and_grad(lambda s: mod.loss_fn(nnx.merge(gd, s), batch, key=jax.random.key(0)),
                                        has_aux=True)(st)
    return loss, aux, nnx.merge(gd, g)


def _max_abs(module):
    return max(float(jnp.abs(x).max()) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("masked", [True, False])
def test_contrareg_loss_trains_network_and_mlps_never_the_autoencoders(masked):
    cfg = CR.Config(ndim=2, **NET, contrasts=("t1", "t2"), num_samples=32, masked=masked)
    model = CR.init(jax.random.key(0), cfg)
    f, m = _pair()
    batch = {"fixed": f, "moving": m, "fixed_contrast": jnp.zeros(2, jnp.int32),
             "moving_contrast": jnp.ones(2, jnp.int32)}
    loss, aux, g = _grads(CR, model, batch)
    assert np.isfinite(float(loss)) and aux["lam"].shape == (2,)
    assert _max_abs(g.aes) == 0.0
    assert _max_abs(g.reg.net) > 0 and _max_abs(g.reg.hyper) > 0
    # only the MLPs of the two contrasts in use get gradients (t1 queries / t2 keys and back)
    assert _max_abs(g.mlps[0]) > 0 and _max_abs(g.mlps[1]) > 0


def test_contrareg_selects_the_batch_contrasts_extractors():
    cfg = CR.Config(ndim=2, **NET, contrasts=("t1", "t2", "flair"), num_samples=32)
    model = CR.init(jax.random.key(0), cfg)
    f, m = _pair()
    batch = {"fixed": f, "moving": m, "fixed_contrast": jnp.zeros(2, jnp.int32),
             "moving_contrast": jnp.full(2, 2, jnp.int32)}
    _, _, g = _grads(CR, model, batch)
    assert _max_abs(g.mlps[2]) > 0 and _max_abs(g.mlps[1]) == 0.0
    feats = CR.features(model, jnp.asarray(2), f)
    want = model.aes[2].encode(f)
    for a, b in zip(feats, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_contrareg_objective_is_alpha_one_minus_lambda_sim_plus_lambda_reg():
    cfg = CR.Config(ndim=2, **NET, contrasts=("t1", "t2"), num_samples=32, hyper=False, reg_weight=0.0)
    model = CR.init(jax.random.key(0), cfg)
    f, m = _pair()
    loss, aux = CR.loss_fn(model, {"fixed": f, "moving": m}, key=jax.random.key(1))
    np.testing.assert_allclose(float(loss), 0.1 * float(aux["similarity"]), rtol=1e-5)


def test_contrareg_config_errors():
    with pytest.raises(ValueError, match="num_samples"):
        CR.Config(num_samples=1)
    with pytest.raises(ValueError, match="contrasts"):
        CR.Config(contrasts=())
    with pytest.raises(ValueError, match="lambda_range"):
        CR.Config(lambda_range=(0.5, 0.2))


def test_deepsim_loss_is_one_minus_eq5_and_the_extractor_is_frozen():
    cfg = DS.Config(ndim=2, **NET, feature_widths=(4, 8, 8), hyper=False, reg_weight=0.0)
    model = DS.init(jax.random.key(0), cfg)
    f, m = _pair()
    loss, aux, g = _grads(DS, model, {"fixed": f, "moving": m})
    assert _max_abs(g.extractor) == 0.0 and _max_abs(g.reg.net) > 0
    assert 0.0 <= float(aux["similarity"]) <= 2.0
    # an image with itself: similarity term 0 at the identity
    same, _ = DS.loss_fn(model, {"fixed": f, "moving": f}, key=jax.random.key(0))
    assert abs(float(same)) < 1e-3


@pytest.mark.parametrize("shape", [(16, 24), (10, 13, 7)])
def test_io_deepsim_descriptors_cosine_is_eq5_mean_of_layer_cosines(shape):
    from jaxreg import losses as L

    ndim = len(shape)
    net = DS.DeepSimNet(ndim, 1, features=(3, 4, 5), rngs=nnx.Rngs(0))
    k1, k2 = jax.random.split(jax.random.key(1))
    a, b = jax.random.uniform(k1, (*shape, 1)), jax.random.uniform(k2, (*shape, 1))
    da, db = DS.descriptors(net, a), DS.descriptors(net, b)
    assert da.shape == (*shape, 12)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(da), axis=-1), 1.0, rtol=1e-5)
    # eq. 5 per voxel, layer by layer: each layer's own cosine, averaged over the 3 layers
    cos = []
    for lo, hi in ((0, 3), (3, 7), (7, 12)):
        x, y = np.asarray(da[..., lo:hi], np.float64), np.asarray(db[..., lo:hi], np.float64)
        cos.append(np.sum(x * y, -1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)))
    np.testing.assert_allclose(-float(L.cosine_similarity_loss(da, db)), np.mean(cos), rtol=1e-5)
    assert abs(float(L.cosine_similarity_loss(da, da)) + 1.0) < 1e-5
    if all(s % 4 == 0 for s in shape):  # no padding: the first layer is the extractor's own, normalised
        f0 = np.asarray(net.encode(a[None])[0][0])
        np.testing.assert_allclose(np.asarray(da[..., :3]) * np.sqrt(3.0),
                                   f0 / np.linalg.norm(f0, axis=-1, keepdims=True), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="expect a"):
        DS.descriptors(net, a[..., 0])


def test_deepsim_heads_size_from_their_kind_not_from_a_leftover_num_classes():
    # an auto-encoder head reconstructs the one input image whatever num_classes says (a 3D run once built a
    # 149-output AE head from a segmentation config's num_classes, and its checkpoint then did not load)
    for kind, want in (("deepsim_ae", 1), ("deepsim_seg", 5)):
        nets = FE.init(jax.random.key(0), FE.Config(ndim=2, kind=kind, contrasts=("t1",), features=(4, 8, 8),
                                                   num_classes=5))
        assert nets.nets[0].out_channels == want
    for head, classes, want in (("ae", 5, 1), ("seg", 5, 5)):
        cfg = DS.Config(ndim=2, feature_head=head, feature_classes=classes, feature_widths=(4, 8, 8))
        assert DS.DeepSim(cfg, rngs=nnx.Rngs(0)).extractor.out_channels == want


@pytest.mark.parametrize("kind", ["contrareg_ae", "deepsim_ae", "deepsim_seg"])
def test_feature_pretraining_loss_decreases(kind):
    import optax

    cfg = FE.Config(ndim=2, kind=kind, contrasts=("t1", "t2"), features=(4, 8, 8) if kind != "contrareg_ae" else (),
                    num_classes=3)
    model = FE.init(jax.random.key(0), cfg)
    x = jax.random.uniform(jax.random.key(1), (2, 16, 24, 2))
    batch = {"images": x, "labels": (x[..., 0] * 3).astype(jnp.int32).clip(0, 2)}
    gd, st = nnx.split(model)
    tx = optax.adam(3e-3)
    opt = tx.init(st)

    @jax.jit
    def step(st, opt, k):
        (loss, _), g = jax.value_and_grad(lambda s: FE.loss_fn(nnx.merge(gd, s), batch, key=k), has_aux=True)(st)
        up, opt = tx.update(g, opt, st)
        return optax.apply_updates(st, up), opt, loss

    losses = []
    for i in range(30):
        st, opt, loss = step(st, opt, jax.random.key(i))
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    with pytest.raises(ValueError, match="images"):
        FE.loss_fn(model, {"fixed": x}, key=jax.random.key(0))


@pytest.mark.slow
def test_pretrained_features_load_into_contrareg_and_deepsim_and_runs_restore(tmp_path):
    """train.main-style runs: features -> registration with features_checkpoint -> restore_model -> register."""
    import ml_collections

    from jaxreg.io.checkpoint import load_trained
    from train.train import train_and_evaluate

    class Src:  # a tiny in-memory source in the batch layout of SliceSource
        def __init__(self, key):
            self.key = key

        def __len__(self):
            return 10 ** 6

        def __getitem__(self, i):
            r = np.random.default_rng(i)
            return {"images": r.uniform(size=(16, 24, 2)).astype(np.float32)}

    import train.train as T

    def run(method, model, workdir):
        c = ml_collections.ConfigDict(dict(method=method, seed=0, num_train_steps=2, batch_size=2, num_devices=1,
                                           learning_rate=1e-3, log_every=1, checkpoint_every=2, eval_every=0,
                                           quiet=True, model=model, data=dict(kind="test")))
        return train_and_evaluate(c, workdir)

    orig = T.build_data
    try:
        T.build_data = lambda config, workdir: (Src(0), [], None)
        run("features", dict(ndim=2, kind="contrareg_ae", contrasts=("t1", "t2")), tmp_path / "ae")
        run("features", dict(ndim=2, kind="deepsim_ae", contrasts=("t1", "t2"), features=(4, 8, 8)), tmp_path / "ds")
    finally:
        T.build_data = orig
    _, ae_model = restore_model(*load_trained(tmp_path / "ae")[:2])
    cr = CR.init(jax.random.key(5), CR.Config(ndim=2, **NET, contrasts=("t2", "t1"), num_samples=16,
                                              features_checkpoint=str(tmp_path / "ae")))
    # reordered to the registration model's contrasts
    for a, b in zip(jax.tree.leaves(nnx.state(cr.aes[0])), jax.tree.leaves(nnx.state(ae_model.nets[1]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="no autoencoder for contrasts"):
        CR.init(jax.random.key(0), CR.Config(ndim=2, **NET, contrasts=("t1", "pd"),
                                             features_checkpoint=str(tmp_path / "ae")))
    with pytest.raises(ValueError, match="expected 'deepsim_ae'"):
        DS.init(jax.random.key(0), DS.Config(ndim=2, **NET, feature_widths=(4, 8, 8),
                                             features_checkpoint=str(tmp_path / "ae")))
    ds = DS.init(jax.random.key(0), DS.Config(ndim=2, **NET, feature_widths=(4, 8, 8),
                                              features_checkpoint=str(tmp_path / "ds")))
    _, ds_feat = restore_model(*load_trained(tmp_path / "ds")[:2])
    for a, b in zip(jax.tree.leaves(nnx.state(ds.extractor)), jax.tree.leaves(nnx.state(ds_feat.nets[0]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a registration checkpoint restores without its feature run (the extractor is in its parameters)
    cfg = {"method": "contrareg", "model": {**NET, "ndim": 2, "contrasts": ("t1", "t2"),
                                            "features_checkpoint": str(tmp_path / "gone")}}
    params = nnx.to_pure_dict(nnx.state(CR.init(jax.random.key(1), CR.Config(ndim=2, **NET, contrasts=("t1", "t2")))))
    mod, restored = restore_model(cfg, params)
    f, m = _pair(b=1)
    res = mod.register(restored, f[0], m[0], lam=0.3)
    assert res.disp.shape == (32, 48, 2) and res.warped.shape == (32, 48, 1)
    with pytest.raises(ValueError, match="lambda-conditioned"):
        mod.register(restored, f[0], m[0])
