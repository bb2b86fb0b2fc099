"""KeyMorph: input cube, augmentation geometry, losses against direct computations, closed-form maps, data."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg.data.keymorph import (CubeSubject, KeyMorphSource, label_table, remap_labels, rotate_header,
                                  rotation_about_axis)
from jaxreg.methods import keymorph as km
from jaxreg.spatial import fit_rigid

SMALL = dict(widths=(4, 8), downsample=(True, True), grid=(16, 16, 16), num_keypoints=8, num_labels=4,
             label_samples=512)


def _blob(shape, centre, sigma=2.0):
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1)
    return np.exp(-np.sum((g - np.asarray(centre, np.float32)) ** 2, -1) / (2 * sigma**2)).astype(np.float32)


def test_canonical_grid_is_world_aligned_and_centred_on_the_centroid():
    affine = np.array([[0, -1.5, 0, 40], [2.0, 0, 0, -30], [0, 0, 3.0, 10], [0, 0, 0, 1]])
    data = _blob((30, 24, 20), (12.0, 9.0, 11.0))
    cube = km.canonical_grid(data, affine, grid=(8, 8, 8), spacing=4.0)
    np.testing.assert_allclose(cube[:3, :3], 4.0 * np.eye(3))
    centre_world = affine[:3, :3] @ np.array([12.0, 9.0, 11.0]) + affine[:3, 3]
    np.testing.assert_allclose(cube[:3, :3] @ np.full(3, 3.5) + cube[:3, 3], centre_world, atol=0.05)
    with pytest.raises(ValueError, match="does not match"):
        km.canonical_grid(data, affine, grid=(8, 8))


def test_augment_matrix_convention_moves_a_blob_to_the_inverse_image_of_its_centre():
    """augmented(y) = image(A y): content at p appears at A^-1 p."""
    cfg = km.Config(**SMALL, rotation=40.0, translation_mm=8.0, scale=0.1, shear=0.05)
    p = np.array([9.0, 6.0, 8.0])
    image = jnp.asarray(_blob((16, 16, 16), p, sigma=1.5))[..., None]
    out, a, u_inv = km._augment(jax.random.key(3), image, jnp.float32(0.0), cfg)
    w = np.asarray(out[..., 0])
    got = np.array([np.sum(w * g) / w.sum() for g in np.indices(w.shape)])
    want = np.linalg.solve(np.asarray(a)[:3, :3], p - np.asarray(a)[:3, 3])
    np.testing.assert_allclose(got, want, atol=0.15)
    assert float(jnp.max(jnp.abs(u_inv))) == 0.0  # no deformation outside pretraining


def test_soft_onehot_and_soft_dice():
    labels = jnp.asarray(np.arange(8 * 8 * 8).reshape(8, 8, 8) % 3, jnp.int32)
    pts = jnp.asarray([[1.0, 2.0, 3.0], [1.5, 2.0, 3.0], [-3.0, 0.0, 0.0]])
    q = np.asarray(km._soft_onehot(labels, pts, 4))
    np.testing.assert_allclose(q[0], np.eye(4)[int(labels[1, 2, 3])])
    np.testing.assert_allclose(q[1], 0.5 * (np.eye(4)[int(labels[1, 2, 3])] + np.eye(4)[int(labels[2, 2, 3])]))
    np.testing.assert_allclose(q[2], 0.0)  # outside: no label
    p = jax.nn.one_hot(jnp.asarray([0, 1, 1, 2, 3]), 4)
    assert float(km.soft_dice_loss(p, p)) == pytest.approx(0.0, abs=1e-6)
    other = jax.nn.one_hot(jnp.asarray([0, 2, 2, 1, 3]), 4)
    # label 1: 0 / 3, label 2: 0 / 3, label 3: 2 / 2 -> mean Dice 1/3
    assert float(km.soft_dice_loss(p, other)) == pytest.approx(2.0 / 3.0, abs=1e-6)


def _batch(task, pretrain, n=16):
    rng = np.random.default_rng(0)
    img = _blob((n,) * 3, (7.0, 8.0, 9.0), sigma=3.0)[None, ..., None]
    lab = (img[..., 0] > 0.3).astype(np.int32) + (img[..., 0] > 0.7).astype(np.int32)
    return {"fixed": jnp.asarray(img), "moving": jnp.asarray(img + 0.01 * rng.random(img.shape, np.float32)),
            "fixed_labels": jnp.asarray(lab), "moving_labels": jnp.asarray(lab),
            "task": jnp.asarray([task], jnp.float32), "pretrain": jnp.asarray([pretrain], jnp.float32)}


def test_pretraining_loss_without_augmentation_is_the_distance_to_p0():
    cfg = km.Config(**SMALL, rotation=0.0, translation_mm=0.0, scale=0.0, shear=0.0, deform_magnitude=0.0)
    model = km.init(jax.random.key(0), cfg)
    batch = _batch(2, 1.0)
    loss, aux = km.loss_fn(model, batch, key=jax.random.key(1))
    p0 = km.pretrain_points(cfg)
    kf, kmv = model(batch["fixed"])[0], model(batch["moving"])[0]
    want = 0.5 * (np.mean(np.sum((np.asarray(kf) - p0) ** 2, -1)) + np.mean(np.sum((np.asarray(kmv) - p0) ** 2, -1)))
    assert float(aux["pretrain"]) == pytest.approx(want, rel=1e-4)
    assert float(loss) == pytest.approx(cfg.pretrain_weight * want, rel=1e-4)
    assert np.all(np.linalg.norm(p0 - 7.5, axis=-1) <= cfg.pretrain_radius * 16 + 1e-4)


@pytest.mark.parametrize("transform", ["affine", "tps", "logunif"])
def test_pair_and_consistency_losses_are_finite_with_finite_gradients(transform):
    from flax import nnx

    cfg = km.Config(**SMALL, transform=transform)
    model = km.init(jax.random.key(0), cfg)
    for task in (0, 1):
        batch = _batch(task, 0.0)
        (loss, aux), grads = nnx.value_and_grad(
            lambda m: km.loss_fn(m, batch, key=jax.random.key(2)), has_aux=True)(model)
        assert np.isfinite(float(loss)) and float(loss) > 0
        assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))
        if task == 0:
            assert 0.0 <= float(aux["dice"]) <= 1.0 and float(loss) == pytest.approx(float(aux["dice"]), rel=1e-5)
        else:
            assert float(loss) == pytest.approx(cfg.consistency_weight * float(aux["consistency"]), rel=1e-5)


def test_validate_reports_dice_repeatability_and_spread():
    cfg = km.Config(**SMALL)
    model = km.init(jax.random.key(0), cfg)
    x = _blob((16,) * 3, (7.0, 8.0, 9.0), sigma=3.0)[..., None]
    lab = (x[..., 0] > 0.3).astype(np.int32)
    ex = {"fixed": x, "moving": x, "fixed_labels": lab, "moving_labels": lab, "name": "same",
          "moving_rotated": x, "rotation": np.eye(4)}
    res = km.validate(model, [ex])
    assert res["val_dice"] == pytest.approx(1.0, abs=1e-6) and res["val_repeat_vox"] == pytest.approx(0.0, abs=1e-5)
    assert res["val_spread_vox"] > 0
    assert 0 <= res["val_min_spread_vox"] <= res["val_spread_vox"]


def test_register_maps_fixed_keypoints_onto_moving_keypoints():
    cfg = km.Config(**SMALL)
    model = km.init(jax.random.key(0), cfg)
    x = jnp.asarray(_blob((16,) * 3, (7.0, 8.0, 9.0), sigma=3.0))[..., None]
    same = km.register(model, x, x)
    np.testing.assert_allclose(np.asarray(same["fitted"][1]), np.eye(4), atol=1e-4)
    y = jnp.roll(x, 2, axis=0)
    out = km.register(model, x, y, transform="tps", tps_lambda=0.0)
    np.testing.assert_allclose(np.asarray(km.map_points(out["fitted"], out["fixed_keypoints"])),
                               np.asarray(out["moving_keypoints"]), atol=2e-3)
    rigid = km.register(model, x, y, transform="rigid")  # the least-squares rotation + translation
    r = np.asarray(rigid["fitted"][1], np.float64)
    assert rigid["fitted"][0] == "affine"
    np.testing.assert_allclose(r[:3, :3] @ r[:3, :3].T, np.eye(3), atol=1e-5)
    np.testing.assert_allclose(r, np.asarray(fit_rigid(out["fixed_keypoints"], out["moving_keypoints"])), atol=1e-6)
    for bad in (-1.0, float("nan"), "x", float("inf")):
        with pytest.raises(ValueError, match="lambda"):
            km.register(model, x, y, transform="tps", tps_lambda=bad)
    with pytest.raises(ValueError, match="transform"):
        km.register(model, x, y, transform="svf")
    with pytest.raises(ValueError, match="transform"):
        km.Config(transform="rigid")  # training: affine, tps or logunif (rigid is a test-time fit)


def test_header_rotation_moves_image_and_labels_together():
    r = rotation_about_axis([1.0, 2.0, -0.5], 135.0)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    c = np.array([10.0, -4.0, 7.0])
    rotated = rotate_header(affine, r, c)
    v = np.array([3.0, 4.0, 5.0, 1.0])  # any voxel: its world point rotates by R about c
    np.testing.assert_allclose(rotated @ v, np.r_[r @ ((affine @ v)[:3] - c) + c, 1.0], atol=1e-12)


def test_labels_remap_and_source_examples():
    a = np.array([[0, 5, 9], [200, 5, 0]])
    table = label_table([a, np.array([7, 0])])
    np.testing.assert_array_equal(table, [5, 7, 9, 200])
    np.testing.assert_array_equal(remap_labels(a, table), [[0, 1, 3], [4, 1, 0]])
    grid = (4, 4, 4)
    lab = np.ones(grid, np.int32)
    subjects = [CubeSubject(f"s{i}", {"t1": np.full(grid, i / 3, np.float32)}, np.eye(4), lab) for i in range(3)]
    multi = [CubeSubject("m", {"t1": np.zeros(grid, np.float32), "t2": np.ones(grid, np.float32)}, np.eye(4))]
    src = KeyMorphSource(subjects, multi, pretrain_examples=5, consistency_prob=0.5, seed=1)
    assert src[3]["pretrain"] == 1 and src[7]["pretrain"] == 0
    tasks = {float(src[i]["task"]) for i in range(5, 60)}
    assert tasks == {0.0, 1.0}
    for i in range(5, 40):
        ex = src[i]
        assert ex["fixed"].shape == grid + (1,) and ex["fixed_labels"].shape == grid
        if ex["task"] == 0:
            assert not np.array_equal(ex["fixed"], ex["moving"]) and ex["fixed_labels"].max() == 1
        else:
            assert ex["fixed_labels"].max() == 0
    np.testing.assert_array_equal(src[11]["moving"], src[11]["moving"])
    always = KeyMorphSource(subjects, multi, pretrain_examples=5, pretrain_always=True, seed=1)
    assert all(always[i]["pretrain"] == 1 for i in range(10)) and {float(always[i]["task"]) for i in range(5, 60)} \
        == {0.0, 1.0}
    with pytest.raises(ValueError, match="2 labelled"):
        KeyMorphSource(subjects[:1], multi)


@pytest.mark.parametrize("ndim, count", [(2, 4), (3, 24)])
def test_cube_rotations_are_the_rotation_group_of_the_cube(ndim, count):
    rots = km.cube_rotations(ndim)
    assert rots.shape == (count, ndim, ndim)
    np.testing.assert_array_equal(rots[0], np.eye(ndim))
    np.testing.assert_allclose(np.einsum("kij,kil->kjl", rots, rots), np.broadcast_to(np.eye(ndim), rots.shape))
    np.testing.assert_allclose(np.linalg.det(rots), 1.0)
    keys = {r.astype(int).tobytes() for r in rots}
    assert len(keys) == count  # distinct
    assert all((a @ b).astype(int).tobytes() in keys for a in rots for b in rots)  # closed: a group
    with pytest.raises(ValueError, match="ndim"):
        km.cube_rotations(4)


def test_rotation_average_makes_world_keypoints_equivariant_to_cube_rotations():
    """A scan turned by 90 degrees in its header about its intensity centroid: the averaged keypoints turn
    with it exactly (the 24 turned cubes sample the same world points), a single cube's need not."""
    from jaxreg import pipeline
    from jaxreg.io import Volume

    model = km.init(jax.random.key(1), km.Config(**SMALL))
    data = (_blob((20, 22, 18), (8.0, 12.0, 9.0), 3.0) + 0.6 * _blob((20, 22, 18), (13.0, 8.0, 6.0), 2.0))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-20.0, -25.0, -15.0]
    vol = Volume(data, affine)
    cube = km.canonical_grid(data, affine, grid=(16, 16, 16), spacing=2.0)
    centroid = cube[:3, :3] @ np.full(3, 7.5) + cube[:3, 3]
    q = km.cube_rotations(3)[5]
    turned = Volume(data, rotate_header(affine, q, centroid))
    base = pipeline.keymorph_world_keypoints(vol, model)
    moved = pipeline.keymorph_world_keypoints(turned, model)
    np.testing.assert_allclose(moved, (base - centroid) @ q.T + centroid, atol=1e-3)
    single = pipeline.keymorph_world_keypoints(turned, model, rotation_average=False)
    single_base = pipeline.keymorph_world_keypoints(vol, model, rotation_average=False)
    assert np.abs(single - ((single_base - centroid) @ q.T + centroid)).max() > 1e-2


def test_spread_penalty_pushes_coplanar_keypoints_off_their_plane():
    pts = np.random.default_rng(0).normal(size=(1, 32, 3)).astype(np.float32) * [5.0, 4.0, 0.0]
    assert float(km.principal_spread(jnp.asarray(pts))[0, -1]) < 1e-3
    cube = np.random.default_rng(1).uniform(-3, 3, size=(1, 4000, 3))
    assert float(km.principal_spread(jnp.asarray(cube))[0, -1]) == pytest.approx(np.sqrt(3.0), rel=0.05)  # U(-3, 3): sd sqrt(3)
    penalty = lambda p: jnp.sum(jnp.square(jax.nn.relu(2.0 - km.principal_spread(p)[:, -1])))
    g = np.asarray(jax.grad(penalty)(jnp.asarray(pts + np.random.default_rng(2).normal(size=pts.shape) * [0, 0, 0.1])))
    assert np.abs(g[..., 2]).max() > 10 * max(np.abs(g[..., :2]).max(), 1e-9)  # the pull is across the plane
