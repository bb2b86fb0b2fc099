"""CAR: Siamese network shapes 2D/3D, projections, loss on pre-augmentation images, ablation options, register."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxreg.methods import car as C
from jaxreg.methods import method_config, restore_model
from jaxreg.nn import SiameseRegNet
from jaxreg.spatial import compose, warp

SMALL = dict(enc_features=(4, 8, 8, 8), dec_features=(8, 8, 8, 8), final_features=(8, 4), proj_features=6)


@pytest.mark.parametrize("ndim,shape,out_level,int_steps", [(2, (32, 48), 0, 0), (2, (32, 48), 1, 5),
                                                            (3, (16, 16, 32), 1, 0)])
def test_network_shapes_and_unit_projections(ndim, shape, out_level, int_steps):
    net = SiameseRegNet(ndim, **SMALL, out_level=out_level, int_steps=int_steps, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (2, *shape, 1))
    field, disp, inv, pf, pm = net(x, x[::-1], inverse=True)
    assert field.shape == disp.shape == inv.shape == (2, *shape, ndim)
    assert pf.shape == pm.shape == (2, *(s // 16 for s in shape), 6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(pf), axis=-1), 1.0, atol=1e-5)
    assert float(jnp.abs(disp).max()) < 1e-2  # the flow conv starts near zero: near the identity
    # Siamese: one shared encoder, so the fixed branch's projection is the moving branch's for swapped inputs
    _, _, _, pf2, pm2 = net(x[::-1], x)
    np.testing.assert_allclose(np.asarray(pf2), np.asarray(pm), atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        net(x[:, :-1], x[:, :-1])


def test_displacement_inverse_composes_to_identity():
    net = SiameseRegNet(2, **SMALL, rngs=nnx.Rngs(0))
    # put a smooth non-zero displacement into the flow bias: u = const + tiny -> inverse ~ -u
    net.flow.bias[...] = jnp.array([0.7, -0.4])
    x = jax.random.uniform(jax.random.key(0), (1, 32, 32, 1))
    _, disp, inv, _, _ = net(x, x, inverse=True)
    residual = compose(disp[0], inv[0])
    assert float(jnp.abs(residual[4:-4, 4:-4]).max()) < 1e-2


def _config(**kw):
    return C.Config(ndim=2, **SMALL, **kw)


def test_config_validation():
    with pytest.raises(ValueError, match="contrast_loss"):
        _config(contrast_loss="l1")
    with pytest.raises(ValueError, match="rc_layers > 0"):
        _config(rc_layers=0)
    with pytest.raises(ValueError, match="rc_kernel"):
        _config(rc_kernel=2)
    with pytest.raises(ValueError, match="ndim"):
        C.Config(ndim=4)
    mod, cfg = method_config("car", {"ndim": 2, "enc_features": [4, 8, 8, 8], "rc_kernel": 3})
    assert mod is C and cfg.enc_features == (4, 8, 8, 8) and cfg.similarity == "lncc" and not cfg.hyper


def test_similarity_is_on_the_pre_augmentation_images():
    """Identical noise images: LNCC of the originals is -1 whatever two RC contrasts the network saw."""
    model = C.init(jax.random.key(0), _config())
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 1))
    loss, aux = C.loss_fn(model, {"fixed": x, "moving": x}, key=jax.random.key(2))
    assert float(aux["similarity"]) == pytest.approx(-1.0, abs=1e-3)
    assert float(aux["contrast"]) > 0  # two different RC contrasts give different latents
    assert float(loss) == pytest.approx(float(aux["similarity"] + 0.3 * aux["smoothness"] + 0.1 * aux["contrast"]),
                                        rel=1e-5)


def test_contrast_invariance_losses():
    cfg = _config()
    p = jax.random.normal(jax.random.key(0), (2, 3, 4, 6))
    p = p / jnp.linalg.norm(p, axis=-1, keepdims=True)
    assert float(C.contrast_invariance(cfg, p, p)) == pytest.approx(0.0, abs=1e-7)
    assert float(C.contrast_invariance(cfg, p, -p)) == pytest.approx(4.0 / 6, rel=1e-5)  # eq. 2 / P for opposite unit vectors
    nce = _config(contrast_loss="infonce")
    same, other = C.contrast_invariance(nce, p, p), C.contrast_invariance(nce, p, jnp.roll(p, 1, axis=1))
    assert float(same) < float(other)


def test_variance_hinge_is_zero_for_spread_projections_and_penalises_a_collapse():
    """Closed form: a collapsed head (one vector everywhere) scores 1/sqrt(P) - 1e-2 (std 0, eps 1e-4); the +-e_c
    frame (std of each channel sqrt(2/(2P)) = 1/sqrt(P)) scores ~0; mse_var adds it to eq. 2, with a gradient."""
    p_dim = 8
    frame = jnp.concatenate([jnp.eye(p_dim), -jnp.eye(p_dim)])[None, :, None, :]  # (1, 2P, 1, P)
    collapsed = jnp.broadcast_to(jnp.eye(p_dim)[0], frame.shape)
    assert float(C.projection_variance_hinge(frame)) == pytest.approx(0.0, abs=1e-3)
    assert float(C.projection_variance_hinge(collapsed)) == pytest.approx(1 / np.sqrt(p_dim) - 1e-2, rel=1e-4)
    cfg = _config(contrast_loss="mse_var")
    assert float(C.contrast_invariance(cfg, collapsed, collapsed)) == pytest.approx(1 / np.sqrt(p_dim) - 1e-2,
                                                                                   rel=1e-4)
    g = jax.grad(lambda x: C.contrast_invariance(cfg, x, x))(collapsed + 0.01 * frame[:, ::-1])
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).max()) > 0


@pytest.mark.parametrize("kw", [dict(), dict(rc_kernel=3, contrast_loss="infonce"), dict(rc_layers=0, contrast_weight=0.0),
                                dict(contrast_loss="mse_var")])
def test_training_lowers_the_loss_for_every_variant(kw):
    """A shifted blob pair: a few Adam steps of CAR, of RC-3 with InfoNCE and of the unaugmented baseline lower the loss."""
    yy, xx = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    blob = lambda cy, cx: np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0)  # noqa: E731
    batch = {"fixed": jnp.asarray(np.stack([blob(16, 16), blob(15, 17)])[..., None], jnp.float32),
             "moving": jnp.asarray(np.stack([blob(18, 15), blob(17, 18)])[..., None], jnp.float32)}
    model = C.init(jax.random.key(0), _config(**kw))
    graphdef, params = nnx.split(model)
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, key):
        (loss, aux), g = jax.value_and_grad(lambda p: C.loss_fn(nnx.merge(graphdef, p), batch, key=key),
                                            has_aux=True)(params)
        up, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, up), opt, aux["similarity"], g

    sims = []
    for i in range(30):
        params, opt, sim, g = step(params, opt, jax.random.key(i % 3))
        sims.append(float(sim))
        assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(g))
    assert np.mean(sims[-5:]) < sims[0] - 0.01


def test_register_shapes_errors_and_restore():
    cfg = _config()
    model = C.init(jax.random.key(0), cfg)
    x = jax.random.uniform(jax.random.key(1), (32, 32, 1))
    out = C.register(model, x, x)
    assert out.disp.shape == out.inverse_disp.shape == (32, 32, 2) and out.warped.shape == (32, 32, 1)
    np.testing.assert_allclose(np.asarray(out.warped), np.asarray(warp(x, out.disp)), atol=1e-6)
    with pytest.raises(ValueError, match="not lambda-conditioned"):
        C.register(model, x, x, lam=0.5)
    with pytest.raises(ValueError, match="differ"):
        C.register(model, x[..., :1, :], x)
    with pytest.raises(ValueError, match="must be"):
        C.register(model, x[..., 0], x[..., 0])
    params = nnx.to_pure_dict(nnx.state(model))
    mod, restored = restore_model({"method": "car", "model": {"ndim": 2, **{k: list(v) if isinstance(v, tuple) else v
                                                                            for k, v in SMALL.items()}}}, params)
    np.testing.assert_allclose(np.asarray(mod.register(restored, x, x).disp), np.asarray(out.disp), atol=1e-6)


def test_variance_hinge_mask_ignores_what_lies_outside_it():
    """Spread vectors in the masked-out half cannot hide a collapsed foreground."""
    p_dim = 8
    frame = jnp.concatenate([jnp.eye(p_dim), -jnp.eye(p_dim)])[None, :, None, :]
    collapsed = jnp.broadcast_to(jnp.eye(p_dim)[0], frame.shape)
    both = jnp.concatenate([collapsed, frame], axis=1)  # (1, 4P, 1, P)
    mask = jnp.concatenate([jnp.ones((1, 2 * p_dim, 1)), jnp.zeros((1, 2 * p_dim, 1))], axis=1)
    assert float(C.projection_variance_hinge(both, mask)) == pytest.approx(1 / np.sqrt(p_dim) - 1e-2, rel=1e-4)
    assert float(C.projection_variance_hinge(both)) < 0.5 * (1 / np.sqrt(p_dim))
