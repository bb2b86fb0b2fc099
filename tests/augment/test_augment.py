"""Augmentation: identities at zero strength, image/label consistency, ranges, determinism, jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg.augment import (random_affine, random_affine_matrix, random_bias_field, random_flip, random_gamma,
                            random_noise, random_svf)
from jaxreg.spatial import warp, warp_labels


def _pair(shape=(20, 18, 12)):
    img = jax.random.uniform(jax.random.key(0), shape + (1,))
    lab = (img[..., 0] * 4).astype(jnp.int32)
    return img, lab


@pytest.mark.parametrize("shape", [(20, 18), (20, 18, 12)])
def test_affine_zero_ranges_is_identity(shape):
    img, lab = _pair(shape)
    out, lab_out, disp = random_affine(jax.random.key(1), img, lab, rotation=0.0, scale=0.0)
    np.testing.assert_allclose(np.asarray(disp), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out), np.asarray(img), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(lab_out), np.asarray(lab))


def test_affine_ranges_and_consistency():
    img, lab = _pair()
    m = random_affine_matrix(jax.random.key(2), img.shape[:-1], rotation=0.0, scale=0.0, translation=2.0)
    assert float(jnp.max(jnp.abs(m[:3, 3]))) <= 2.0 and np.allclose(np.asarray(m[:3, :3]), np.eye(3), atol=1e-6)
    m2 = random_affine_matrix(jax.random.key(2), img.shape[:-1], rotation=0.0, scale=0.2)
    s = np.linalg.svd(np.asarray(m2[:3, :3]), compute_uv=False)
    assert np.all((s >= 0.8 - 1e-6) & (s <= 1.2 + 1e-6))
    f = jax.jit(lambda k, i, l: random_affine(k, i, l, rotation=15.0, translation=2.0, scale=0.1, shear=0.05))
    out, lab_out, disp = f(jax.random.key(3), img, lab)
    np.testing.assert_allclose(np.asarray(out), np.asarray(warp(img, disp)), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(lab_out), np.asarray(warp_labels(lab, disp)))
    again = f(jax.random.key(3), img, lab)[0]
    np.testing.assert_array_equal(np.asarray(again), np.asarray(out))


def test_svf_and_flip_move_labels_with_the_image():
    img, lab = _pair()
    out, lab_out, disp = random_svf(jax.random.key(4), img, lab, mean_magnitude=1.0, control_spacing=8)
    np.testing.assert_allclose(float(jnp.mean(jnp.linalg.norm(disp, axis=-1))), 1.0, rtol=0.3)
    np.testing.assert_array_equal(np.asarray(lab_out), np.asarray(warp_labels(lab, disp)))
    fi, fl, flips = random_flip(jax.random.key(5), img, lab, p=1.0)
    assert bool(jnp.all(flips))
    np.testing.assert_array_equal(np.asarray(fi), np.asarray(img[::-1, ::-1, ::-1]))
    np.testing.assert_array_equal(np.asarray(fl), np.asarray(lab[::-1, ::-1, ::-1]))
    same, _, none = random_flip(jax.random.key(5), img, None, p=0.0)
    assert not bool(jnp.any(none)) and np.array_equal(np.asarray(same), np.asarray(img))
    with pytest.raises(ValueError, match="labels"):
        random_flip(jax.random.key(0), img, lab[:3])


def test_intensity_augmentations():
    img, _ = _pair()
    k = jax.random.key(6)
    np.testing.assert_allclose(np.asarray(random_gamma(k, img, log_gamma_std=0.0)), np.asarray(img), atol=1e-6)
    g = random_gamma(k, img, log_gamma_std=0.5)
    assert float(g.min()) >= 0.0 and float(g.max()) <= 1.0
    np.testing.assert_allclose(np.asarray(random_bias_field(k, img, strength=0.0)), np.asarray(img), atol=1e-6)
    b = random_bias_field(k, img, strength=0.3) / jnp.maximum(img, 1e-6)
    assert float(b.min()) > 0.0 and float(jnp.std(b)) > 1e-3
    np.testing.assert_allclose(np.asarray(random_noise(k, img, std=0.0)), np.asarray(img))
    n = random_noise(k, img, std=0.1) - img
    assert 0.0 < float(jnp.std(n)) <= 0.1
