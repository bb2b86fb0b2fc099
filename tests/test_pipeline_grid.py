"""Working-grid choice: auto_resolution's rule and working_grid's arguments."""
import numpy as np
import pytest

from jaxreg.pipeline import auto_resolution, working_grid


def _affine(spacing):
    return np.diag(list(spacing) + [1.0])


@pytest.mark.parametrize("shape, spacing, expected", [
    ((182, 218, 182), (1.0, 1.0, 1.0), 2.0),     # 1 mm brain (median extent 182 mm): today's 2 mm
    ((256, 224, 26), (0.9, 0.9, 5.5), 2.0),      # thick-slice brain: the in-plane extent decides
    ((80, 160, 160), (0.5, 0.5, 0.5), 1.0),      # 4 x 8 x 8 cm spinal-cord field of view: 80 mm / 80 voxels
    ((100, 100, 40), (0.4, 0.4, 1.0), 0.5),      # 4 x 4 cm: 0.5 mm
    ((20, 20, 20), (3.0, 3.0, 3.0), 3.0),        # never finer than the scan itself
])
def test_auto_resolution_rule(shape, spacing, expected):
    assert auto_resolution(shape, _affine(spacing)) == pytest.approx(expected)


@pytest.mark.parametrize("shape, spacing, expected", [
    ((182, 218, 182), (1.0, 1.0, 1.0), 1.0),     # 1 mm brain: rigid/affine on the 1 mm grid
    ((256, 224, 26), (0.9, 0.9, 5.5), 1.0),
    ((80, 160, 160), (0.5, 0.5, 0.5), 0.5),      # spinal cord: half the deformable 1 mm
    ((20, 20, 20), (3.0, 3.0, 3.0), 3.0),        # never finer than the scan itself
])
@pytest.mark.parametrize("transform", ["rigid", "affine"])
def test_auto_resolution_linear_transforms_twice_as_fine(shape, spacing, expected, transform):
    assert auto_resolution(shape, _affine(spacing), transform) == pytest.approx(expected)
    assert auto_resolution(shape, _affine(spacing), "disp") == auto_resolution(shape, _affine(spacing))


def test_working_grid_auto_follows_transform():
    aff = _affine((1.0, 1.0, 1.0))
    assert working_grid((182, 218, 182), aff, "auto")[0] == (91, 109, 91)
    assert working_grid((182, 218, 182), aff, "auto", "rigid")[0] == (182, 218, 182)
    # an explicit spacing is used as given, whatever the transform
    assert working_grid((182, 218, 182), aff, 2.0, "rigid")[0] == (91, 109, 91)


def test_working_grid_auto_and_bad_resolution():
    shape, _, _ = working_grid((80, 160, 160), _affine((0.5, 0.5, 0.5)), "auto")
    assert shape == (40, 80, 80)
    with pytest.raises(ValueError, match="auto"):
        working_grid((8, 8, 8), np.eye(4), "coarse")


@pytest.mark.parametrize("transform, expected", [("rigid", (160, 160, 8)), ("svf", (80, 80, 8))])
def test_register_volumes_auto_grid_follows_transform(transform, expected):
    from jaxreg.io import Volume
    from jaxreg.pipeline import config_for, register_volumes

    g = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in (160, 160, 8)], indexing="ij"), -1)
    data = np.exp(-np.sum(((g - [80, 80, 4]) / [40, 30, 6]) ** 2, -1)).astype(np.float32)  # a 1 mm blob
    vol = Volume(data, _affine((1.0, 1.0, 1.0)))
    cfg = config_for("io-mse", transform=transform, levels=1, iterations=(2,), affine_iterations=(2,),
                     affine_levels=1)
    reg = register_volumes(vol, vol, config=cfg, resolution="auto")
    assert reg.work["fixed"].shape[:3] == expected


def test_field_of_view_matches_mapping_every_voxel():
    from jaxreg.io import Volume, grid_to_grid_matrix
    from jaxreg.pipeline import field_of_view

    c, s = np.cos(0.3), np.sin(0.3)  # an oblique moving grid, smaller than the working grid
    moving_affine = np.array([[1.2 * c, -s, 0.0, -4.0], [1.2 * s, c, 0.1, 3.0], [0.0, 0.0, 2.5, -7.0], [0, 0, 0, 1]])
    vol = Volume(np.zeros((9, 11, 5), np.float32), moving_affine)
    shape, affine = (14, 12, 10), np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = [-8.0, -6.0, -9.0]
    g = grid_to_grid_matrix(affine, moving_affine)
    x = np.stack(np.indices(shape, np.float64), -1) @ g[:3, :3].T + g[:3, 3]
    ref = np.all((x >= -0.5) & (x <= np.asarray(vol.data.shape) - 0.5), axis=-1)
    fov = field_of_view(vol, shape, affine)
    assert fov.dtype == np.float32 and 0 < fov.sum() < fov.size
    np.testing.assert_array_equal(fov, ref.astype(np.float32))


def _metrics_similarity_and_reference(images):
    """The metrics' (before, after) similarity of three images, and the same computed directly on each whole
    image (MIND-SSC of the host-normalised images)."""
    from jaxreg import losses as L
    from jaxreg import pipeline
    from jaxreg.optimize import InstanceConfig, normalize_intensity, similarity_fn

    cfg = InstanceConfig()
    got = pipeline._similarity_before_after(cfg, dict(zip(("fixed", "moving", "warped"), images)), None)
    f, m, w = (L.mind_ssc(normalize_intensity(x), radius=cfg.mind_radius, dilation=cfg.mind_dilation)
               for x in images)
    return [got["similarity_before"], got["similarity_after"]], [float(similarity_fn(cfg)(f, x, None)) for x in (m, w)]


def test_metrics_similarity_normalises_in_its_program_as_on_the_host():
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    # a grid that is its own size class (no padding): equal to rounding
    images = [jnp.asarray(rng.gamma(2.0, 100.0 * (k + 1), (20, 24, 20, 1)).astype(np.float32))
              for k in range(3)]  # each its own intensity range
    got, want = _metrics_similarity_and_reference(images)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[0] != got[1]


def test_metrics_similarity_of_several_images_in_one_call_equals_one_image_per_call():
    """_similarity_losses loops over the other images in one program (issue 18: one call's buffers): each loss
    equals that image's alone, each with its own intensity range; the thread register_volumes starts gives the
    same dictionary (None for learned descriptors, which the metrics compute)."""
    import jax.numpy as jnp

    from jaxreg import pipeline
    from jaxreg.optimize import InstanceConfig

    rng = np.random.default_rng(1)
    images = [jnp.asarray(rng.gamma(2.0, 100.0 * (k + 1), (21, 18, 13, 1)).astype(np.float32))
              for k in range(3)]  # padded to its class; other intensity ranges
    work = dict(zip(("fixed", "moving", "warped"), images))
    for cfg in (InstanceConfig(), InstanceConfig(similarity="ngf")):
        both = pipeline._similarities(cfg, images[0], images[1:], None)
        alone = [pipeline._similarities(cfg, images[0], (x,), None)[0] for x in images[1:]]
        np.testing.assert_allclose(both, alone, rtol=1e-6)
        assert both[0] != both[1]
        started = pipeline._start_similarity(cfg, work).result()
        assert started == {"similarity_before": both[0], "similarity_after": both[1]}
    assert pipeline._start_similarity(InstanceConfig(similarity="dns"), work) is None


# ----------------------------------------------------------------------------- size classes of the output programs


def test_upsample_disp_equals_resize_disp_also_padded():
    import jax.numpy as jnp

    from jaxreg import pipeline
    from jaxreg.programs import bucket_shape, crop_high, pad_high
    from jaxreg.spatial import resize_disp

    rng = np.random.default_rng(1)
    work, fine = (13, 11, 9), (26, 33, 9)  # ratios 2, 3, 1
    disp = rng.normal(0, 2, work + (3,)).astype(np.float32)
    ratio = jnp.asarray(np.asarray(fine, np.float32) / np.asarray(work, np.float32))
    want = np.asarray(resize_disp(jnp.asarray(disp), fine))
    np.testing.assert_allclose(pipeline._upsample_disp(jnp.asarray(disp), ratio, shape=fine), want, atol=2e-5)
    padded = pipeline._upsample_disp(jnp.asarray(pad_high(disp, bucket_shape(work), "edge")), ratio,
                                     shape=bucket_shape(fine))
    assert bucket_shape(fine) != fine and bucket_shape(work) != work
    np.testing.assert_allclose(crop_high(padded, fine), want, atol=2e-5)


def test_field_regularity_of_a_padded_field_equals_the_unpadded():
    import jax.numpy as jnp

    from jaxreg import metrics as M
    from jaxreg import pipeline
    from jaxreg.programs import bucket_shape, pad_high

    rng = np.random.default_rng(2)
    shape = (21, 18, 11)
    disp = rng.normal(0, 0.4, shape + (3,)).astype(np.float32)  # rough: some folding, large SDlogJ
    disp[-1] += 3.0 * rng.normal(0, 1, disp[-1].shape)  # the border voxels matter
    want = [float(M.folding_percent(jnp.asarray(disp))), float(M.sdlogj(jnp.asarray(disp)))]
    assert want[0] > 0
    for mode in ("constant", "edge"):  # whatever the padding holds
        padded = jnp.asarray(pad_high(disp, bucket_shape(shape), mode))
        got = [float(v) for v in pipeline._field_regularity(padded, jnp.asarray(shape, jnp.int32))]
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_resample_to_grid_is_exact_when_padded_to_size_classes():
    import jax.numpy as jnp

    from jaxreg.io import nifti
    from jaxreg.io.nifti import resample_to_grid

    rng = np.random.default_rng(3)
    data = rng.normal(0, 1, (19, 23, 13)).astype(np.float32)
    src = np.diag([1.1, 0.9, 2.0, 1.0])
    src[:3, 3] = [-3, 2, 1]
    ref = np.diag([2.0, 2.0, 2.5, 1.0])
    ref[:3, 3] = [-5, -4, -6]  # the reference reaches outside the data: zeros blended at the borders
    g = np.linalg.inv(src) @ ref
    for order, x in ((1, data), (0, (data > 0).astype(np.int32) * 7)):
        want = np.asarray(nifti._resample(jnp.asarray(x), jnp.asarray(g, jnp.float32), shape=(13, 15, 9),
                                          order=order))
        got = resample_to_grid(x, src, (13, 15, 9), ref, order=order)
        assert got.shape == (13, 15, 9)
        np.testing.assert_array_equal(got, want)


def test_metrics_similarity_on_a_padded_grid():
    import jax.numpy as jnp

    rng = np.random.default_rng(4)
    base = np.cumsum(np.cumsum(rng.normal(0, 1, (40, 37, 30)), 0), 1)  # smooth, structured
    images = [jnp.asarray((base + rng.normal(0, 3, base.shape))[..., None].astype(np.float32)) for _ in range(3)]
    got, want = _metrics_similarity_and_reference(images)
    # 37 -> 40 and 30 -> 32: only voxels within MIND-SSC's reach of those faces differ (0.5 % here; without the
    # mask, i.e. the padded grid's mean, 20 %)
    np.testing.assert_allclose(got, want, rtol=1e-2)


def test_the_registrations_programs_are_compiled_ahead_with_the_signatures_it_calls(compiled_by):
    """register_volumes prepares the affine and deformable stages' programs, the output program and the metrics'
    (issue 18): each is compiled once, in the background, so the shapes and dtypes it prepares are those it calls
    with."""
    from jaxreg import pipeline
    from jaxreg.io import Volume
    from jaxreg.optimize import InstanceConfig

    seen = compiled_by
    g = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in (50, 54, 46)], indexing="ij"), -1)
    fixed = Volume(np.exp(-np.sum(((g - [25, 27, 23]) / [14, 12, 11]) ** 2, -1)).astype(np.float32),
                   _affine((1.5, 1.5, 1.5)))
    moving = Volume(np.exp(-np.sum(((g - [26, 26, 22]) / [13, 12, 12]) ** 2, -1)).astype(np.float32),
                    _affine((1.5, 1.5, 1.5)))
    cfg = InstanceConfig(iterations=(2, 2, 2), affine_iterations=(2,), affine_levels=2, num_samples=4096)
    reg = pipeline.register_volumes(fixed, moving, config=cfg, resolution=1.5, metrics=True)
    pipeline.registration_metrics("io-mind", cfg, reg, fixed)
    prepared = {"_affine_pyramid", "_binary_level_masks", "_affine_level", "_resample_affine", "_level_features",
                "_deformable_level", "_finish_deformable", "_to_fixed_grid", "_field_regularity", "_similarity_losses"}
    background = [n for n, t in seen if t.startswith("jaxreg-prepare")]
    assert all(t.startswith("jaxreg-prepare") for n, t in seen if n in prepared), seen
    assert prepared <= set(background) and background.count("_deformable_level") == 2  # a dense and a sampled level
