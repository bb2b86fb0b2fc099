"""NGF: closed forms on linear ramps, invariances, symmetry, range."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg.losses import ngf


def _ramp(spatial, axis):
    """Intensity equal to the voxel index along ``axis``: gradient e_axis."""
    grid = np.indices(spatial, dtype=np.float32)[axis]
    return grid[..., None]


def test_closed_forms_on_ramps(spatial, evaluator):
    eps = 0.01  # the default; ramps have mean |grad| = 1, so e = eps
    x0, x1 = _ramp(spatial, 0), _ramp(spatial, 1)
    values = evaluator(ngf).values([(x0, x0), (x0, 3.0 * x0 - 2.0), (x0, x1), (x0, -x0)])
    np.testing.assert_allclose(values[:2], 0.0, atol=1e-6)
    orthogonal = 1 - eps**4 / (1 + eps**2) ** 2
    antiparallel = 1 - ((1 - eps**2) / (1 + eps**2)) ** 2
    np.testing.assert_allclose(values[2], orthogonal, rtol=1e-6)
    np.testing.assert_allclose(values[3], antiparallel, rtol=1e-3)


def test_invariances_symmetry_and_range(spatial, make_image, evaluator):
    f, m = make_image(0, spatial), make_image(1, spatial)
    values = evaluator(ngf).values(
        [(f, m), (m, f), (f, 4.0 * m + 2.0), (0.5 * f - 1.0, m), (f, -m)]
    )
    np.testing.assert_allclose(values[1:4], values[0], rtol=1e-5)
    # a < 0: only approximately (the e_f e_m term keeps its sign)
    np.testing.assert_allclose(values[4], values[0], rtol=1e-2)
    assert np.all((values > 0.05) & (values <= 1.0))


def test_flat_regions_in_both_images_match(spatial, make_image, evaluator):
    f = make_image(0, spatial)
    flat = np.full_like(f, 2.0)
    values = evaluator(ngf).values([(flat, flat), (f, flat)])
    np.testing.assert_allclose(values[0], 0.0, atol=1e-7)
    assert 0.5 < values[1] <= 1.0  # edges against no edges


def test_bad_options_raise():
    img = jnp.zeros((8, 8, 1))
    with pytest.raises(ValueError, match="epsilon"):
        ngf(img, img, epsilon=0.0)
    with pytest.raises(ValueError, match="2 voxels"):
        ngf(jnp.zeros((8, 1, 1)), jnp.zeros((8, 1, 1)))
