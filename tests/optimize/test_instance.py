"""Instance optimisation: recovery of known transforms, compile-once, errors."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg.augment import random_deformation
from jaxreg.optimize import InstanceConfig, register_instance
from jaxreg.optimize import instance as inst
from jaxreg.spatial import compose, integrate, resize_disp, warp

SHAPE = (48, 44)


def _phantom(shape=SHAPE):
    """Smooth 2D phantom: a few Gaussian blobs of different intensity."""
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1)
    c = np.asarray(shape, np.float32) / 2
    img = np.zeros(shape, np.float32)
    for off, amp, sig in [((0, 0), 1.0, 9.0), ((-8, 6), 0.6, 4.0), ((7, -5), -0.5, 3.5), ((9, 9), 0.4, 3.0)]:
        img += amp * np.exp(-np.sum((g - c - np.asarray(off)) ** 2, -1) / (2 * sig**2))
    return jnp.asarray(img)[..., None]


FAST = dict(levels=2, iterations=(60, 60), learning_rates=(1e-2, 5e-3), smoothness=(0.5, 0.4),
            control_spacing=2, field_sigma=1.0,
            affine_iterations=(60, 40), affine_finest_factor=1)


def test_affine_stage_recovers_translation():
    fixed = _phantom()
    t = jnp.asarray([2.5, -1.5])
    moving = warp(fixed, -jnp.broadcast_to(t, SHAPE + (2,)), padding="border")  # moving(x + t) = fixed(x)
    cfg = InstanceConfig(similarity="mse", transform="affine", affine_similarity=None, **FAST)
    res = register_instance(fixed, moving, config=cfg)
    np.testing.assert_allclose(res.matrix[:2, 2], np.asarray(t), atol=0.25)
    np.testing.assert_allclose(res.matrix[:2, :2], np.eye(2), atol=0.03)
    # The inverse of an affine result is the inverse matrix.
    np.testing.assert_allclose(np.asarray(compose(res.inverse_disp, res.total_disp))[10:-10, 10:-10], 0, atol=1e-3)


@pytest.mark.parametrize("transform,integration_grad", [("svf", "identity"), ("svf", "exact"), ("disp", "identity")])
def test_deformable_recovers_known_deformation(transform, integration_grad):
    fixed = _phantom()
    disp_true, inv_true = random_deformation(jax.random.key(1), SHAPE, mean_magnitude=1.5, control_spacing=12)
    moving = warp(fixed, inv_true, padding="border")
    cfg = InstanceConfig(similarity="mse", transform=transform, affine=False, integration_grad=integration_grad,
                         **FAST)
    res = register_instance(fixed, moving, config=cfg)
    inner = (slice(8, -8), slice(8, -8))
    before = float(jnp.mean(jnp.linalg.norm(disp_true, axis=-1)[inner]))
    after = float(jnp.mean(jnp.linalg.norm(res.total_disp - disp_true, axis=-1)[inner]))
    assert after < 0.5 * before, (before, after)
    for curve in res.losses:
        assert curve[-1] < curve[0]
        assert np.all(np.isfinite(curve))
    # The returned inverse undoes the map (exp(-v) for svf, fixed point for disp).
    resid = jnp.linalg.norm(compose(res.inverse_disp, res.total_disp), axis=-1)[inner]
    assert float(jnp.mean(resid)) < 0.03 and float(jnp.max(resid)) < 0.3
    if transform == "svf":
        # The default number of squarings (5) integrates the optimised velocity
        # as accurately as 12 would, to a few hundredths of a voxel.
        # (the velocity's control grid spans the padded bucket grid, SHAPE's (48, 44) -> (48, 48))
        assert inst.bucket_shape(SHAPE) == (48, 48)
        exact = resize_disp(integrate(res.velocity, steps=12), inst.bucket_shape(SHAPE))[: SHAPE[0], : SHAPE[1]]
        assert float(jnp.max(jnp.abs(res.disp - exact))) < 0.03


@pytest.mark.parametrize("similarity", ["mind", "mi", "nmi", "ngf", "lncc"])
def test_every_similarity_lowers_its_loss_across_contrasts(similarity):
    fixed = _phantom()
    disp_true, inv_true = random_deformation(jax.random.key(2), SHAPE, mean_magnitude=1.0, control_spacing=12)
    moving = 1.0 - warp(fixed, inv_true, padding="border") ** 2  # another "contrast"
    cfg = InstanceConfig(similarity=similarity, affine=False, **FAST)
    res = register_instance(fixed, moving, config=cfg)
    assert all(np.isfinite(c).all() for c in res.losses)
    assert res.losses[-1][-1] < res.losses[-1][0]
    assert np.isfinite(np.asarray(res.total_disp)).all()


def test_compiles_once_per_shape():
    fixed = _phantom()
    moving = warp(fixed, jnp.full(SHAPE + (2,), 0.7))
    cfg = InstanceConfig(similarity="mse", affine=True, **FAST)
    register_instance(fixed, moving, config=cfg)
    jitted = (inst._deformable_level, inst._affine_level, inst._level_features, inst._resample_affine,
              inst._finish_deformable)
    sizes = [f._cache_size() for f in jitted]
    register_instance(moving, fixed, config=cfg)  # same shapes, new values
    assert [f._cache_size() for f in jitted] == sizes


def test_bucket_size_is_a_small_ladder():
    sizes = [inst.bucket_size(n) for n in range(1, 400)]
    assert all(b >= n and b <= max(1.25 * n, 8) for n, b in zip(range(1, 400), sizes))
    assert all(inst.bucket_size(b) == b for b in sizes)  # idempotent
    assert sizes == sorted(sizes)
    assert sorted(set(b for b in sizes if 64 <= b <= 256)) == [64, 80, 96, 112, 128, 160, 192, 224, 256]
    assert inst.bucket_shape((120, 120, 78)) == (128, 128, 80) and inst.bucket_shape((75, 90)) == (80, 96)


def test_scans_of_one_size_class_share_every_program():
    """(44, 45) and (47, 41) both pad to (48, 48): the second registration compiles no level program."""
    cfg = InstanceConfig(similarity="mse", affine=True, **FAST)
    for shape in ((44, 45), (47, 41)):
        fixed = _phantom(shape)
        moving = warp(fixed, jnp.full(shape + (2,), 0.7))
        res = register_instance(fixed, moving, config=cfg)
        assert res.total_disp.shape == shape + (2,) and res.inverse_disp.shape == shape + (2,)
        if shape == (44, 45):
            jitted = (inst._deformable_level, inst._affine_level, inst._level_features, inst._finish_deformable,
                      inst._affine_pyramid)
            sizes = [f._cache_size() for f in jitted]
    assert [f._cache_size() for f in jitted] == sizes


def test_grid_buckets_change_the_result_by_little():
    """Padding (48, 44) to (48, 48) changes only the control grid's extent: the map moves < 0.1 voxel."""
    fixed = _phantom()
    disp_true, inv_true = random_deformation(jax.random.key(1), SHAPE, mean_magnitude=1.5, control_spacing=12)
    moving = warp(fixed, inv_true, padding="border")
    cfg = InstanceConfig(similarity="mse", affine=False, **FAST)
    padded = register_instance(fixed, moving, config=cfg)
    plain = register_instance(fixed, moving, config=dataclasses.replace(cfg, grid_buckets=False))
    inner = (slice(8, -8), slice(8, -8))
    diff = jnp.linalg.norm(padded.total_disp - plain.total_disp, axis=-1)[inner]
    err = [float(jnp.mean(jnp.linalg.norm(r.total_disp - disp_true, axis=-1)[inner])) for r in (padded, plain)]
    assert float(jnp.mean(diff)) < 0.1, (float(jnp.mean(diff)), err)
    assert abs(err[0] - err[1]) < 0.05, err


def test_sampled_levels_share_one_program():
    """Levels evaluated at random samples run one compiled program (their arrays are padded to the finest
    level's grid, the level is traced) and recover a known deformation as well as dense evaluation does."""
    fixed = _phantom()
    disp_true, inv_true = random_deformation(jax.random.key(1), SHAPE, mean_magnitude=1.5, control_spacing=12)
    moving = warp(fixed, inv_true, padding="border")
    inner = (slice(8, -8), slice(8, -8))
    errors, programs = {}, {}
    for n in (256, 10 ** 5):  # 256 < 24 x 22 voxels: both levels sampled; 10^5: both dense
        cfg = InstanceConfig(similarity="mse", affine=False, num_samples=n, **FAST)
        assert [inst._sampled_level(cfg, inst._level_shape(SHAPE, f)) for f in (2, 1)] == [n == 256] * 2
        before = inst._deformable_level._cache_size()
        res = register_instance(fixed, moving, config=cfg)
        programs[n] = inst._deformable_level._cache_size() - before
        errors[n] = float(jnp.mean(jnp.linalg.norm(res.total_disp - disp_true, axis=-1)[inner]))
    assert programs[256] == 1
    before = float(jnp.mean(jnp.linalg.norm(disp_true, axis=-1)[inner]))
    assert errors[256] < 0.4 * before and errors[256] < errors[10 ** 5] + 0.05, (before, errors)


def test_resize_to_reads_only_the_level_corner():
    """_resize_to on a padded array (traced level shape) equals jax.image.resize of the unpadded one."""
    x = jax.random.uniform(jax.random.key(0), (30, 22))
    padded = jnp.pad(x, ((0, 34), (0, 42)), constant_values=7.0)
    for out in ((15, 11), (8, 8), (30, 22)):
        want = jax.image.resize(x, out, method="linear", antialias=False)
        got = jax.jit(inst._resize_to, static_argnums=2)(padded, jnp.asarray(x.shape, jnp.int32), out)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)  # the padding (7) never leaks


def test_3d_runs_and_recovers_translation():
    fixed = jnp.stack([_phantom((28, 28))[..., 0]] * 20, axis=-1)[..., None]
    fixed = fixed * jnp.hanning(20)[None, None, :, None]
    t = jnp.asarray([1.5, -1.0, 0.5])
    moving = warp(fixed, -jnp.broadcast_to(t, fixed.shape[:-1] + (3,)), padding="border")
    cfg = InstanceConfig(similarity="mse", transform="svf", affine=False, levels=2, iterations=(40, 40),
                         learning_rates=(1e-2, 5e-3), smoothness=(0.5, 0.4))
    res = register_instance(fixed, moving, config=cfg)
    inner = res.total_disp[6:-6, 6:-6, 5:-5]
    np.testing.assert_allclose(np.asarray(jnp.median(inner.reshape(-1, 3), axis=0)), np.asarray(t), atol=0.35)


@pytest.mark.parametrize("kw, match", [
    (dict(similarity="ssd"), "similarity"),
    (dict(transform="bspline"), "transform"),
    (dict(levels=2), "one value per level"),
    (dict(control_spacing=0), "control_spacing"),
    (dict(num_samples=-1), "num_samples"),
    (dict(affine_similarity="cc"), "affine_similarity"),
    (dict(affine_finest_factor=0), "affine_finest_factor"),
    (dict(affine_levels=0), "affine_levels"),
    (dict(integration_grad="adjoint"), "integration_grad"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        InstanceConfig(**kw)


def test_shape_errors():
    with pytest.raises(ValueError, match="fixed grid"):
        register_instance(_phantom(), _phantom((40, 40)))
    with pytest.raises(ValueError, match="spatial"):
        register_instance(jnp.zeros((4, 4, 4, 4, 1)), jnp.zeros((4, 4, 4, 4, 1)))


def test_config_is_hashable_static():
    cfg = InstanceConfig()
    assert hash(cfg) == hash(dataclasses.replace(cfg))


def test_normalize_intensity_host_and_traced_paths_agree():
    x = jax.random.gamma(jax.random.key(3), 2.0, (20, 18, 2)) * jnp.asarray([1.0, 50.0])
    host = inst.normalize_intensity(x)
    traced = jax.jit(inst.normalize_intensity)(x)
    np.testing.assert_allclose(np.asarray(host), np.asarray(traced), atol=1e-6)
    ref = np.clip((np.asarray(x) - np.percentile(x, 0.5, axis=(0, 1))) /
                  (np.percentile(x, 99.5, axis=(0, 1)) - np.percentile(x, 0.5, axis=(0, 1))), 0, 1)
    np.testing.assert_allclose(np.asarray(host), ref, atol=1e-5)
    assert float(jnp.max(inst.normalize_intensity(jnp.ones((5, 5, 1))))) == 0.0  # constant -> 0


# ----------------------------------------------------------------------------- affine stage (issue 17)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 0.9, 4.0)])
def test_rigid_parameters_are_exactly_rigid_in_mm(spacing):
    """Rigid raw parameters give S A_vox S^-1 orthonormal with det 1 on anisotropic grids: no scale or shear leaks in."""
    sp = jnp.asarray(spacing, jnp.float32)
    raw = jax.random.normal(jax.random.key(0), (12,)) * 20.0  # scales/shears too: they must be ignored
    a_vox = np.asarray(inst._raw_to_matrix(raw, sp, jnp.asarray([30.0, 40.0, 50.0]), jnp.float32(60.0), rigid=True))
    s = np.diag(np.concatenate([np.asarray(spacing), [1.0]]))
    a_mm = s @ a_vox @ np.linalg.inv(s)
    np.testing.assert_allclose(a_mm[:3, :3] @ a_mm[:3, :3].T, np.eye(3), atol=1e-5)
    assert abs(np.linalg.det(a_mm[:3, :3]) - 1.0) < 1e-5
    # the affine model does let them in
    a_aff = np.asarray(inst._raw_to_matrix(raw, sp, jnp.zeros(3), jnp.float32(60.0), rigid=False))
    lin = (s @ a_aff @ np.linalg.inv(s))[:3, :3]
    assert np.abs(lin @ lin.T - np.eye(3)).max() > 1e-2


def test_affine_points_are_fixed_inside_the_box_and_as_many_as_asked():
    box = np.array([[3, 5], [20, 30]])
    p1, w1 = inst._affine_points((40, 40), box, 100, seed=0)
    p2, _ = inst._affine_points((40, 40), box, 100, seed=0)
    np.testing.assert_array_equal(np.asarray(p1), np.asarray(p2))  # deterministic per level
    assert p1.shape == (100, 2) and float(w1.sum()) == 100
    assert np.all(np.asarray(p1) >= box[0]) and np.all(np.asarray(p1) <= box[1])
    assert len({tuple(r) for r in np.asarray(p1)}) == 100  # without replacement
    # a box smaller than the sample count: all of it once, the rest zero-weight padding of the same size
    p3, w3 = inst._affine_points((40, 40), np.array([[0, 0], [4, 4]]), 100, seed=0)
    assert p3.shape == (100, 2) and float(w3.sum()) == 25


def test_affine_init_header_keeps_an_aligned_pair_and_auto_chooses_a_start():
    fixed = _phantom()
    cfg = InstanceConfig(similarity="mse", transform="rigid", affine_similarity=None, affine_init="header", **FAST)
    res = register_instance(fixed, fixed, config=cfg)
    np.testing.assert_allclose(res.matrix, np.eye(3), atol=0.05)
    messages = []
    t = jnp.asarray([3.0, -2.0])
    moving = warp(fixed, -jnp.broadcast_to(t, SHAPE + (2,)), padding="border")
    res = register_instance(fixed, moving, config=dataclasses.replace(cfg, affine_init="auto"),
                            progress=messages.append)
    assert any("from header" in m for m in messages) and any("from com" in m for m in messages)
    assert any("from axes" in m for m in messages)
    assert any(m.startswith("affine initialisation:") for m in messages)
    np.testing.assert_allclose(res.matrix[:2, 2], np.asarray(t), atol=0.25)
    # "upright": the headers and the centre of mass compete, the principal-axes rotations do not
    messages = []
    res = register_instance(fixed, moving, config=dataclasses.replace(cfg, affine_init="upright"),
                            progress=messages.append)
    assert any("from header" in m for m in messages) and any("from com" in m for m in messages)
    assert not any("from axes" in m for m in messages)
    np.testing.assert_allclose(res.matrix[:2, 2], np.asarray(t), atol=0.25)


def test_a_given_start_competes_with_header_and_com_under_auto_and_replaces_them_otherwise():
    """``init_matrix`` (``--init keymorph``) is one more start under ``affine_init="auto"``: a wrong one loses."""
    fixed = _phantom()
    t = jnp.asarray([3.0, -2.0])
    moving = warp(fixed, -jnp.broadcast_to(t, SHAPE + (2,)), padding="border")
    wrong = np.eye(3, dtype=np.float32)
    wrong[:2, 2] = [-9.0, 8.0]  # far from the truth and from both default starts
    cfg = InstanceConfig(similarity="mse", transform="rigid", affine_similarity=None, affine_init="auto", **FAST)
    messages = []
    res = register_instance(fixed, moving, config=cfg, init_matrix=wrong, progress=messages.append)
    assert any("from given" in m for m in messages) and any("from header" in m for m in messages)
    assert "affine initialisation: given" not in messages
    np.testing.assert_allclose(res.matrix[:2, 2], np.asarray(t), atol=0.25)
    good = np.eye(3, dtype=np.float32)
    good[:2, 2] = np.asarray(t) + 0.5
    messages = []
    res = register_instance(fixed, moving, config=cfg, init_matrix=good, progress=messages.append)
    np.testing.assert_allclose(res.matrix[:2, 2], np.asarray(t), atol=0.25)
    # with an explicit affine_init the given start is the only one
    messages = []
    register_instance(fixed, moving, config=dataclasses.replace(cfg, affine_init="header"), init_matrix=wrong,
                      progress=messages.append)
    assert any("from given" in m for m in messages) and not any("from header" in m for m in messages)


def test_moving_mask_ignores_what_lies_outside_the_moving_field_of_view():
    """A copy of the structure where the moving scan has no data pulls the unmasked affine stage, not the masked one."""
    fixed = _phantom()
    t = jnp.asarray([2.0, 1.5])
    moving = warp(fixed, -jnp.broadcast_to(t, SHAPE + (2,)), padding="border")
    fov = jnp.ones(SHAPE).at[:, :12].set(0.0)
    # out of the field of view (columns 0-11): the phantom's central blob again (fixed columns 16-27). The decoy
    # used to be shifted the other way, i.e. all zeros, and the test then compared two results 0.07 voxel apart.
    decoy = warp(fixed, jnp.broadcast_to(jnp.asarray([0.0, 16.0]), SHAPE + (2,)), padding="zeros")
    moving = jnp.where(fov[..., None] > 0, moving, decoy)
    cfg = InstanceConfig(similarity="mi", transform="rigid", affine_init="header", **FAST)
    masked = register_instance(fixed, moving, config=cfg, moving_mask=fov)
    np.testing.assert_allclose(masked.matrix[:2, 2], np.asarray(t), atol=0.3)  # measured: 0.18 voxel off
    unmasked = register_instance(fixed, moving, config=cfg)
    assert np.abs(unmasked.matrix[:2, 2] - np.asarray(t)).max() > 2.0  # measured: pulled ~7 voxels


def test_anisotropic_spacing_recovers_a_world_rotation():
    """A rotation in mm on a grid with 1 x 2 mm voxels is recovered (voxel-space rotation would be a shear)."""
    spacing = np.array([1.0, 2.0])
    shape = (64, 32)
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1) * spacing
    c = (np.asarray(shape) - 1) / 2 * spacing

    def blobs(x):
        img = np.zeros(shape, np.float32)
        for off, amp, sig in [((0, 0), 1.0, 14.0), ((-12, 10), 0.7, 6.0), ((10, -8), 0.5, 5.0), ((14, 14), 0.4, 4.0)]:
            img += amp * np.exp(-np.sum((x - c - np.asarray(off)) ** 2, -1) / (2 * sig**2))
        return img

    angle = np.deg2rad(6.0)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    fixed = jnp.asarray(blobs(g))[..., None]
    moving = jnp.asarray(blobs((g - c) @ rot + c))[..., None]  # moving(R^-1 ... ): fixed point p <-> moving R p
    cfg = InstanceConfig(similarity="mse", transform="rigid", affine_similarity=None, affine_init="header",
                         **{**FAST, "affine_iterations": (100, 100, 100, 100)})
    res = register_instance(fixed, moving, config=cfg, spacing=spacing)
    s = np.diag(np.concatenate([spacing, [1.0]]))
    lin = (s @ res.matrix @ np.linalg.inv(s))[:2, :2]
    np.testing.assert_allclose(lin, rot, atol=0.01)


@pytest.mark.parametrize("kw, match", [(dict(affine_init="keymorph"), "affine_init"),
                                       (dict(mi_kernel="box"), "mi_kernel"),
                                       (dict(affine_model="tps"), "affine_model"),
                                       (dict(affine_samples=-1), "affine_samples"),
                                       (dict(affine_deformable_samples=-1), "affine_deformable_samples"),
                                       (dict(affine_deformable_factor=0), "affine_deformable_factor")])
def test_affine_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        InstanceConfig(**kw)


def test_relative_eps_option_recovers_a_known_deformation():
    fixed = _phantom()
    disp_true, inv_true = random_deformation(jax.random.key(1), SHAPE, mean_magnitude=1.5, control_spacing=12)
    moving = warp(fixed, inv_true, padding="border")
    cfg = InstanceConfig(similarity="mse", affine=False, relative_eps=3.0, **FAST)
    res = register_instance(fixed, moving, config=cfg)
    inner = (slice(8, -8), slice(8, -8))
    before = float(jnp.mean(jnp.linalg.norm(disp_true, axis=-1)[inner]))
    after = float(jnp.mean(jnp.linalg.norm(res.total_disp - disp_true, axis=-1)[inner]))
    assert after < 0.7 * before, (before, after)
    with pytest.raises(ValueError, match="relative_eps"):
        InstanceConfig(relative_eps=-1.0)


def test_field_decay_shrinks_the_displacement_and_zero_is_the_default():
    fixed = _phantom()
    disp_true, inv_true = random_deformation(jax.random.key(1), SHAPE, mean_magnitude=1.5, control_spacing=12)
    moving = warp(fixed, inv_true, padding="border")
    size = {}
    for decay in (0.0, 1e3, 1e6):
        cfg = InstanceConfig(similarity="mse", affine=False, field_decay=decay, **FAST)
        size[decay] = float(jnp.mean(jnp.linalg.norm(register_instance(fixed, moving, config=cfg).disp, axis=-1)))
    assert InstanceConfig().field_decay == 0.0
    assert size[1e6] < 0.2 * size[0.0] and size[1e3] < size[0.0], size
    with pytest.raises(ValueError, match="field_decay"):
        InstanceConfig(field_decay=-1.0)


def test_plausible_affine_rejects_reflections_collapses_and_nans():
    eye = np.eye(4)
    assert inst.plausible_affine(eye)
    assert not inst.plausible_affine(np.diag([-1.0, 1.0, 1.0, 1.0]))  # a reflection, det -1
    assert not inst.plausible_affine(np.diag([0.4, 0.5, 0.5, 1.0]))  # det 0.1: a collapse
    assert not inst.plausible_affine(np.diag([2.1, 2.0, 2.0, 1.0]))  # det 8.4
    assert not inst.plausible_affine(np.where(eye == 1, np.nan, 0.0))
    assert inst.plausible_affine(np.diag([0.5, 1.0, 1.0]), det_range=(0.4, 1.0))


def test_affine_stage_keeps_the_initialisation_when_every_result_is_rejected(monkeypatch):
    """With an accepted range that excludes every refinement, the stage keeps the unrefined start, says so,
    so a degenerate fit never reaches the output."""
    fixed = _phantom()
    t = jnp.asarray([3.0, -2.0])
    moving = warp(fixed, -jnp.broadcast_to(t, SHAPE + (2,)), padding="border")
    monkeypatch.setattr(inst, "AFFINE_DET_RANGE", (1.5, 8.0))  # det 1 (any near-rigid fit) is now out of range
    messages = []
    cfg = InstanceConfig(similarity="mse", transform="affine", affine_similarity=None, affine_init="auto", **FAST)
    res = register_instance(fixed, moving, config=cfg, progress=messages.append)
    # header, com and the two principal-axes starts of a 2D pair
    assert sum("rejected (determinant out of range)" in m for m in messages) == 4
    assert any(m.startswith("affine stage rejected") for m in messages)
    # the kept start is one of them, unrefined: the exact start matrix
    starts = [np.eye(3), *inst.principal_axes_starts(inst.normalize_intensity(fixed),
                                                     inst.normalize_intensity(moving)).values()]
    com = np.eye(3)
    com[:2, 2] = np.asarray(inst.center_of_mass(inst.normalize_intensity(moving))) - np.asarray(
        inst.center_of_mass(inst.normalize_intensity(fixed)))
    assert min(np.abs(np.asarray(res.matrix) - m).max() for m in starts + [com]) < 1e-5


def test_harmonic_extension_is_linear_between_two_clamped_planes():
    """Closed form: u = f on the planes x = 0 and x = n - 1 (weight 1), zero normal derivative on the other
    faces, Laplace elsewhere -> u is linear in x; points of weight 1 keep their value exactly."""
    n = 12
    field = np.zeros((n, 5, 4, 3), np.float32)
    field[-1] = (n - 1.0, -2.0 * (n - 1), 0.5)
    weight = np.zeros((n, 5, 4), np.float32)
    weight[0] = weight[-1] = 1.0
    out = np.asarray(inst.harmonic_extension(jnp.asarray(field), jnp.asarray(weight), iterations=2000))
    x = np.arange(n, dtype=np.float32)[:, None, None]
    for c, slope in enumerate((1.0, -2.0, 0.5 / (n - 1))):
        np.testing.assert_allclose(out[..., c], np.broadcast_to(slope * x, out.shape[:-1]), atol=1e-3)
    np.testing.assert_array_equal(out[-1], field[-1])
    np.testing.assert_array_equal(out[0], field[0])


def test_harmonic_extension_keeps_weighted_points_and_lowers_the_diffusion_energy():
    from jaxreg import losses as L

    rng = np.random.default_rng(0)
    field = jnp.asarray(rng.normal(size=(10, 9, 8, 3)).astype(np.float32))
    weight = np.zeros((10, 9, 8), np.float32)
    weight[3:7, 2:6, 2:6] = 1.0
    out = inst.harmonic_extension(field, jnp.asarray(weight), iterations=300)
    np.testing.assert_array_equal(np.asarray(out)[3:7, 2:6, 2:6], np.asarray(field)[3:7, 2:6, 2:6])
    assert float(L.diffusion(out)) < 0.2 * float(L.diffusion(field))
    # a constant field is its own extension; weight 1 everywhere changes nothing
    const = jnp.full((6, 5, 2), 1.5, jnp.float32)
    np.testing.assert_allclose(np.asarray(inst.harmonic_extension(const, jnp.zeros((6, 5)), iterations=50)), 1.5,
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(inst.harmonic_extension(field, jnp.ones((10, 9, 8)), iterations=5)),
                                  np.asarray(field))


def _elongated(x, c):
    """An elongated, asymmetric phantom (head-like: distinct principal axes, no mirror symmetry) at points x (mm)."""
    img = np.zeros(x.shape[:-1], np.float32)
    scale = np.asarray([13.0, 8.0, 6.0][: x.shape[-1]])
    for off, amp, sig in [((0, 0, 0), 1.0, 1.0), ((6, 4, 2), 0.6, 0.35), ((-8, -3, 1), -0.4, 0.3)]:
        off = np.asarray(off[: x.shape[-1]], np.float32)
        img += amp * np.exp(-0.5 * np.sum(((x - c - off) / (scale * sig)) ** 2, -1))
    return img


def _rotation(axis, degrees):
    axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.deg2rad(degrees)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def test_principal_axes_starts_contain_any_rotation_on_an_anisotropic_grid():
    spacing = np.array([1.0, 1.0, 2.0])
    shape = (64, 64, 32)
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1) * spacing
    c = (np.asarray(shape) - 1) / 2 * spacing
    rot, shift = _rotation([1.0, 2.0, 0.5], 150.0), np.array([3.0, -2.0, 4.0])
    fixed = _elongated(g, c)
    moving = _elongated((g - c - shift) @ rot + c, c)  # fixed point p <-> moving point R (p - c) + c + shift
    starts = inst.principal_axes_starts(jnp.asarray(fixed)[..., None], jnp.asarray(moving)[..., None], spacing)
    assert len(starts) == 4
    fg = np.argwhere(fixed > 0.3 * fixed.max()).astype(np.float64)
    true = ((fg * spacing - c) @ rot.T + c + shift) / spacing
    errors = []
    for m in starts.values():
        m = np.asarray(m, np.float64)
        assert np.linalg.det(m[:3, :3]) > 0
        errors.append(np.abs(fg @ m[:3, :3].T + m[:3, 3] - true).mean())
    assert min(errors) < 0.5 and max(errors) > 5  # one start is the rotation; the others are its sign flips
    assert inst.principal_axes_starts(jnp.zeros((8, 8, 8, 1)), jnp.asarray(moving)[..., None], spacing) == {}


def test_auto_init_recovers_a_rotation_of_160_degrees_the_header_start_does_not():
    shape = (56, 56)
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1)
    c = (np.asarray(shape) - 1) / 2
    a = np.deg2rad(160.0)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    fixed = jnp.asarray(_elongated(g, c))[..., None]
    moving = jnp.asarray(_elongated((g - c) @ rot + c, c))[..., None]
    cfg = InstanceConfig(similarity="mse", transform="rigid", affine_similarity=None, affine_init="auto", **FAST)
    messages = []
    res = register_instance(fixed, moving, config=cfg, progress=messages.append)
    assert any(m.startswith("affine initialisation: axes") for m in messages)
    np.testing.assert_allclose(np.asarray(res.matrix)[:2, :2], rot, atol=0.03)
    header = register_instance(fixed, moving, config=dataclasses.replace(cfg, affine_init="header"))
    assert np.abs(np.asarray(header.matrix)[:2, :2] - rot).max() > 0.5


@pytest.mark.parametrize("shape", [(5, 7), (9, 6, 11)])
def test_mask_moments_equal_the_listed_voxels(shape):
    import scipy.ndimage as ndi

    rng = np.random.default_rng(len(shape))
    mask = ndi.gaussian_filter(rng.standard_normal(shape), 1.0) > 0.1
    pts = np.argwhere(mask).astype(np.float64)
    n, mean, cov = inst._mask_moments(mask)
    assert n == len(pts) > 2
    np.testing.assert_allclose(mean, pts.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(pts.T), rtol=1e-10, atol=1e-12)
    assert inst._mask_moments(np.zeros(shape, bool))[0] == 0


def test_box_points_cover_the_box_uniformly_and_stay_inside():
    box = jnp.array([[2, 5, 1], [4, 6, 3]], jnp.int32)  # 3 x 2 x 3 = 18 voxels
    pts = np.asarray(inst._box_points(jax.random.key(0), box, 18000))
    assert pts.shape == (18000, 3) and pts.dtype == np.int32
    assert np.all(pts >= np.asarray(box[0])) and np.all(pts <= np.asarray(box[1]))
    _, counts = np.unique(pts, axis=0, return_counts=True)
    assert len(counts) == 18  # every voxel is drawn, each ~1000 times (binomial sd ~31)
    assert counts.min() > 850 and counts.max() < 1150
    # a one-voxel box and a 2D box
    np.testing.assert_array_equal(inst._box_points(jax.random.key(1), jnp.array([[3, 4], [3, 4]]), 5),
                                  np.tile([3, 4], (5, 1)))
    assert not np.array_equal(pts[:100], np.asarray(inst._box_points(jax.random.key(1), box, 18000))[:100])


@pytest.mark.parametrize("similarity", ["mi", "mse"])
def test_affine_level_slots_are_independent(similarity):
    """Candidates refined together in one call end exactly where each ends alone (the others' steps and the
    stopping rule are per slot), also when they stop after different numbers of steps."""
    fixed = _phantom()
    moving = warp(fixed, jnp.full(SHAPE + (2,), 1.5))
    cfg = InstanceConfig(similarity=similarity, affine_tolerance=0.05, **FAST)
    slots, d = inst.AFFINE_SLOTS, 2
    n_raw = sum(inst.num_params(d).values())
    pts, wts = inst._affine_points(SHAPE, np.array([[2, 2], [45, 41]]), 256, seed=0)
    starts = [np.eye(3, dtype=np.float32), np.array([[1, 0, 1.0], [0, 1, -2.0], [0, 0, 1]], np.float32),
              np.array([[0.98, 0.1, 0], [-0.1, 0.98, 0], [0, 0, 1]], np.float32)]

    def run(k_starts):
        init = np.broadcast_to(np.eye(3, dtype=np.float32), (slots, 3, 3)).copy()
        init[: len(k_starts)] = k_starts
        owner = np.array([k if k < len(k_starts) else 0 for k in range(slots)], np.int32)
        w = np.broadcast_to(wts, (slots, len(wts))) * (np.arange(slots) < len(k_starts))[:, None]
        valid = jnp.ones(SHAPE + (1,))
        raw, curve, n, _ = inst._affine_level(
            jnp.zeros((slots, n_raw)), jnp.asarray(init), jnp.asarray(owner), fixed, moving, valid,
            jnp.asarray(np.broadcast_to(pts, (slots,) + pts.shape)), jnp.asarray(w, jnp.float32),
            jnp.ones(d), jnp.ones(d), jnp.zeros(d), jnp.float32(20.0), jnp.float32(0.5), np.int32(60),
            cfg=cfg, max_iterations=60, rigid=False)
        return np.asarray(raw), np.asarray(curve), np.asarray(n)

    together = run(starts)
    assert len(set(together[2][:3].tolist())) > 1  # the slots stopped at different steps
    assert (together[2][3:] == 0).all() and (together[0][3:] == 0).all()  # unused slots do not move
    for k, start in enumerate(starts):
        alone = run([start])
        np.testing.assert_allclose(together[0][k], alone[0][0], rtol=1e-5, atol=1e-6)
        assert together[2][k] == alone[2][0]
        np.testing.assert_allclose(together[1][k], alone[1][0], rtol=1e-5, atol=1e-7)
