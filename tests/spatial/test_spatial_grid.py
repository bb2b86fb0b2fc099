"""Closed-form tests for jaxreg.spatial.grid (identity grids, voxel <-> world)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg.spatial import identity_grid, voxel_spacing, voxel_to_world, world_to_voxel

SHAPES = {2: (3, 5), 3: (2, 3, 4)}


def _rotation(d, rng):
    """Random proper rotation (det +1) from the QR of a Gaussian matrix."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    q = q * np.sign(np.diag(r))[None, :]
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _random_affine(d, rng):
    a = np.eye(d + 1)
    a[:d, :d] = _rotation(d, rng) @ np.diag(rng.uniform(0.5, 2.0, d))
    a[:d, d] = rng.uniform(-50, 50, d)
    return a


@pytest.mark.parametrize("d", [2, 3])
def test_identity_grid_values(d):
    shape = SHAPES[d]
    grid = identity_grid(shape)
    assert grid.shape == shape + (d,)
    assert grid.dtype == jnp.float32
    expected = np.stack(np.indices(shape), axis=-1).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(grid), expected)


def test_identity_grid_dtype():
    assert identity_grid((2, 2), dtype=jnp.float16).dtype == jnp.float16


@pytest.mark.parametrize("shape", [(5,), (2, 0), (0, 3, 3), (2, 2, 2, 2), ()])
def test_identity_grid_bad_shape(shape):
    with pytest.raises(ValueError):
        identity_grid(shape)


@pytest.mark.parametrize("d", [2, 3])
def test_voxel_to_world_known_affine(d):
    # Diagonal spacing plus an origin: world = spacing * x + origin.
    spacing = np.array([2.0, 3.0, 0.5][:d])
    origin = np.array([10.0, -5.0, 1.0][:d])
    affine = np.eye(d + 1)
    affine[:d, :d] = np.diag(spacing)
    affine[:d, d] = origin
    x = identity_grid(SHAPES[d])
    world = np.asarray(voxel_to_world(x, affine))
    np.testing.assert_allclose(world, np.asarray(x) * spacing + origin, rtol=0, atol=1e-5)
    # A general affine against the homogeneous product computed in numpy.
    rng = np.random.default_rng(d)
    affine = _random_affine(d, rng)
    pts = rng.uniform(-3, 20, (7, d)).astype(np.float32)
    hom = np.concatenate([pts, np.ones((7, 1))], axis=1) @ affine.T
    np.testing.assert_allclose(np.asarray(voxel_to_world(jnp.asarray(pts), affine)), hom[:, :d],
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("d", [2, 3])
def test_world_voxel_round_trip(d):
    rng = np.random.default_rng(10 + d)
    affine = _random_affine(d, rng)
    pts = jnp.asarray(rng.uniform(-5, 30, (4, 6, d)), jnp.float32)
    back = world_to_voxel(voxel_to_world(pts, affine), affine)
    np.testing.assert_allclose(np.asarray(back), np.asarray(pts), rtol=0, atol=1e-4)
    # world_to_voxel of the world image of an integer voxel gives that voxel.
    world = np.concatenate([np.asarray(pts), np.ones((4, 6, 1))], axis=-1) @ affine.T
    np.testing.assert_allclose(np.asarray(world_to_voxel(jnp.asarray(world[..., :d], jnp.float32), affine)),
                               np.asarray(pts), rtol=0, atol=1e-4)


@pytest.mark.parametrize("d", [2, 3])
def test_world_voxel_round_trip_traced_affine(d):
    rng = np.random.default_rng(20 + d)
    affine = jnp.asarray(_random_affine(d, rng), jnp.float32)
    pts = jnp.asarray(rng.uniform(-5, 30, (9, d)), jnp.float32)
    fn = jax.jit(lambda p, a: world_to_voxel(voxel_to_world(p, a), a))
    np.testing.assert_allclose(np.asarray(fn(pts, affine)), np.asarray(pts), rtol=0, atol=1e-4)


@pytest.mark.parametrize("d", [2, 3])
def test_voxel_spacing_scaled_rotated(d):
    rng = np.random.default_rng(30 + d)
    spacing = rng.uniform(0.3, 3.0, d)
    affine = np.eye(d + 1)
    affine[:d, :d] = _rotation(d, rng) @ np.diag(spacing)
    affine[:d, d] = rng.uniform(-100, 100, d)  # translation must not matter
    np.testing.assert_allclose(voxel_spacing(affine), spacing, rtol=1e-12)
    # Axes permuted and flipped (array axis j -> world axis d-1-j, negated):
    # spacing stays attached to the array axis and positive.
    flip = np.eye(d + 1)
    flip[:d, :d] = -np.diag(spacing)[::-1]
    np.testing.assert_allclose(voxel_spacing(flip), spacing, rtol=1e-12)


@pytest.mark.parametrize("fn", [voxel_to_world, world_to_voxel])
def test_affine_shape_mismatch(fn):
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        fn(jnp.zeros((5, 3)), np.eye(3))
    with pytest.raises(ValueError):
        fn(jnp.zeros((5, 2)), np.eye(4))
