"""Properties every similarity in ``SIMILARITIES`` must have, in 2D and 3D.

Identity is the optimum, translations are worse, masks exclude voxels,
gradients are correct (``check_grads``) and finite (identity, constant
images), jit traces once, and bad shapes raise ValueError. (The shared
evaluator runs every loss under ``vmap``; the per-loss test files compare its
values with closed forms and NumPy oracles.)
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxreg.losses import SIMILARITIES

NAMES = sorted(SIMILARITIES)
# Voxels a masked-in voxel's loss term may read beyond itself (MIND-SSC:
# dilation 2 + radius 2; NGF: 1); the others exclude masked-out voxels exactly.
SUPPORT = {"mind": 4, "ngf": 1}
EXPECTED_AT_IDENTITY = {"mse": 0.0, "lncc": -1.0, "mind": 0.0, "ngf": 0.0}


def test_registry_names():
    assert set(SIMILARITIES) == {"mse", "lncc", "mi", "nmi", "local_mi", "mind", "ngf"}


@pytest.mark.parametrize("name", NAMES)
def test_identity_is_optimum_masks_exclude_and_gradients_are_finite(
    name, spatial, make_image, evaluator
):
    ev = evaluator(SIMILARITIES[name])
    f, m = make_image(0, spatial), make_image(1, spatial)
    const = np.full_like(f, 0.7)
    # Overwrite everything outside the mask (beyond the loss's support) with
    # junk: the masked loss must not move, the unmasked one must.
    cut = spatial[0] // 2
    mask = np.zeros(spatial, np.float32)
    mask[:cut] = 1
    start = cut + SUPPORT.get(name, 0)
    junk = 10.0 * make_image(2, spatial, sigma=0.5) - 3.0
    f2, m2 = f.copy(), m.copy()
    f2[start:], m2[start:] = junk[start:], -junk[start:]

    values, grads = ev([
        (f, f), (f, np.roll(f, 1, 0)), (f, np.roll(f, 3, 0)), (f, m),
        (f, m, mask), (f2, m2, mask), (f2, m2),
        (f, const), (const, const), (const, f),
    ])
    identity, shift1, shift3, other = values[:4]
    assert identity < shift1 < shift3
    assert identity < other
    if name in EXPECTED_AT_IDENTITY:
        np.testing.assert_allclose(identity, EXPECTED_AT_IDENTITY[name], atol=1e-4)
    np.testing.assert_allclose(values[5], values[4], rtol=1e-5, atol=1e-6)
    assert abs(values[6] - values[4]) > 1e-3
    # Finite gradients at identity and on constant images.
    assert np.all(np.isfinite(values))
    for i in (0, 7, 8, 9):
        assert np.all(np.isfinite(grads[i])), f"{name}: non-finite gradient in pair {i}"


@pytest.mark.parametrize("name", NAMES)
def test_jit_traces_once(name, make_image, evaluator):
    spatial = (24, 20)
    ev = evaluator(SIMILARITIES[name])
    f, m = make_image(3, spatial), make_image(4, spatial)
    first = ev.values([(f, m)])
    np.testing.assert_allclose(ev.values([(m, m), (f, m)])[1], first[0])
    # Every call so far, from any test, reused a single trace per shape.
    assert ev.traced_shapes.count((16, *spatial, 1)) == 1


def _check_grads(name, spatial):
    # float64 so finite differences are accurate; distinct extremes so the
    # min-max normalisation of MI never switches voxels under perturbation.
    rng = np.random.default_rng(0)
    f = rng.uniform(0.1, 0.9, (*spatial, 1))
    m = 0.5 * f + 0.5 * rng.uniform(0.1, 0.9, (*spatial, 1))
    m[(0,) * len(spatial)] = 1.5
    m[(1,) * len(spatial)] = -0.5
    fn = SIMILARITIES[name]
    with jax.enable_x64(True):
        fixed = jnp.asarray(f)
        loss = jax.jit(lambda moving: fn(fixed, moving))
        check_grads(loss, (jnp.asarray(m),), order=1, modes=["rev"], eps=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_check_grads_2d(name):
    _check_grads(name, (10, 9))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_check_grads_3d(name):
    _check_grads(name, (7, 6, 5))


@pytest.mark.parametrize("name", NAMES)
def test_bad_shapes_raise(name):
    fn = SIMILARITIES[name]
    img = jnp.zeros((8, 8, 1))
    with pytest.raises(ValueError, match=r"\(8, 8, 1\).*\(8, 7, 1\)"):
        fn(img, jnp.zeros((8, 7, 1)))
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        fn(jnp.zeros((8, 8)), jnp.zeros((8, 8)))  # no channel axis
    with pytest.raises(ValueError, match="ndim 5"):
        fn(jnp.zeros((4, 4, 4, 4, 1)), jnp.zeros((4, 4, 4, 4, 1)))
    with pytest.raises(ValueError, match=r"mask.*\(8, 7\)"):
        fn(img, img, mask=jnp.ones((8, 7), bool))
