"""On a real T1 slice, after a short feature pretraining: ContraReg's PatchNCE and DeepSim are best at the true
alignment among known shifts (the property the registration networks are trained on)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxreg.methods import contrareg as CR
from jaxreg.methods import deepsim as DS
from jaxreg.methods import features as FE

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


@pytest.fixture(scope="module")
def t1_slice(data_dir):
    import nibabel as nib

    vol = np.asarray(nib.load(str(data_dir / "brats_space" / "brats_gli_00001" / "t1.nii.gz")).dataobj, np.float32)
    sl = vol[::2, ::2, vol.shape[2] // 2]
    fg = np.argwhere(sl > 0)
    c = fg.mean(0).astype(int)
    sl = sl[c[0] - 32:c[0] + 32, c[1] - 40:c[1] + 40]
    sl = np.clip(sl / np.percentile(sl[sl > 0], 99.5), 0, 1)
    return jnp.asarray(sl[..., None], jnp.float32)


def _pretrain(kind, image, steps=60):
    cfg = FE.Config(ndim=2, kind=kind, contrasts=("t1",), features=() if kind == "contrareg_ae" else (8, 16, 16))
    model = FE.init(jax.random.key(0), cfg)
    gd, st = nnx.split(model)
    tx = optax.adam(2e-3)
    opt = tx.init(st)
    batch = {"images": jnp.stack([image, image[::-1], image[:, ::-1], image[::-1, ::-1]])}

    @jax.jit
    def step(st, opt, k):
        (loss, _), g = jax.value_and_grad(lambda s: FE.loss_fn(nnx.merge(gd, s), batch, key=k), has_aux=True)(st)
        up, opt = tx.update(g, opt, st)
        return optax.apply_updates(st, up), opt, loss

    first = None
    for i in range(steps):
        st, opt, loss = step(st, opt, jax.random.key(i))
        first = float(loss) if first is None else first
    assert float(loss) < first  # it learned something
    return nnx.merge(gd, st)


SHIFTS = (-4, -2, -1, 0, 1, 2, 4)


def test_patchnce_is_lowest_at_the_true_alignment_after_pretraining(t1_slice):
    feats = _pretrain("contrareg_ae", t1_slice)
    cr = CR.init(jax.random.key(1), CR.Config(ndim=2, contrasts=("t1",), num_samples=256))
    FE.copy_into(cr.aes[0], feats.nets[0])
    fixed = t1_slice[None]
    fl = CR.features(cr, jnp.asarray(0), fixed)
    mask = (fixed[..., 0] > 0.05).astype(jnp.float32)
    losses = []
    for s in SHIFTS:
        moved = jnp.roll(fixed, s, axis=1)
        d = CR.contrastive_distance(cr, jax.random.key(0), fl, jnp.asarray(0), CR.features(cr, jnp.asarray(0), moved),
                                    jnp.asarray(0), mask)
        losses.append(float(d[0]))
    assert int(np.argmin(losses)) == SHIFTS.index(0), losses
    assert losses[SHIFTS.index(4)] > losses[SHIFTS.index(1)] > losses[SHIFTS.index(0)]


def test_deepsim_is_highest_at_the_true_alignment_after_pretraining(t1_slice):
    feats = _pretrain("deepsim_ae", t1_slice)
    ds = DS.init(jax.random.key(1), DS.Config(ndim=2, feature_widths=(8, 16, 16)))
    FE.copy_into(ds.extractor, feats.nets[0])
    from jaxreg.losses import deepsim

    fixed = t1_slice[None]
    ff = [x[0] for x in DS.features(ds, fixed)]
    sims = [float(deepsim(ff, [x[0] for x in DS.features(ds, jnp.roll(fixed, s, axis=2))])) for s in SHIFTS]
    assert int(np.argmax(sims)) == SHIFTS.index(0) and abs(sims[SHIFTS.index(0)] - 1.0) < 1e-5, sims
    assert sims[SHIFTS.index(-4)] < sims[SHIFTS.index(-1)] < 1.0
