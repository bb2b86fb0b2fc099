"""ITK/ANTs interoperability of world-space warps, checked against antspyx.

Synthetic case: fixed grid 20x22x18 (spacing 1.2/0.9/1.5 mm, rotated), moving
grid 24x20x26 (spacing 1.0/1.1/1.3 mm, other rotation, axis 0 flipped), moving
content a smooth function of world position. The registration map is
``y = G (x + u(x))``: a smooth random voxel displacement ``u`` (|u| <= 2
voxels) on the fixed grid followed by the fixed -> moving grid matrix ``G``.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from jaxreg.io import (
    Volume,
    apply_transform,
    grid_to_grid_matrix,
    load_image,
    load_itk_warp,
    save_image,
    save_itk_warp,
    voxel_disp_to_world,
    world_warp_to_voxel_disp,
)
from jaxreg.spatial import sample

ants = pytest.importorskip("ants")

FIXED_SHAPE = (20, 22, 18)
MOVING_SHAPE = (24, 20, 26)


def _affine(shape, spacing, euler_deg, flip=(1, 1, 1), centre=(1.5, -2.0, 3.0)):
    lin = Rotation.from_euler("xyz", euler_deg, degrees=True).as_matrix() @ np.diag(spacing) @ np.diag(flip)
    a = np.eye(4)
    a[:3, :3] = lin
    a[:3, 3] = np.asarray(centre) - lin @ ((np.asarray(shape) - 1) / 2)
    return a


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)


def _content(world):
    x, y, z = np.moveaxis(world, -1, 0)
    blob = np.exp(-((x - 2) ** 2 + y**2 + (z + 1) ** 2) / 30)
    return np.sin(x / 4) + np.cos(y / 5) * np.sin(z / 6) + 3 * blob


def _ants_warp(fixed_path, moving_path, warp_path, interpolator="linear"):
    out = ants.apply_transforms(fixed=ants.image_read(str(fixed_path)), moving=ants.image_read(str(moving_path)),
                                transformlist=[str(warp_path)], interpolator=interpolator)
    return out.numpy()


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("itk")
    rng = np.random.default_rng(0)
    a_f = _affine(FIXED_SHAPE, (1.2, 0.9, 1.5), (8, -5, 12))
    a_m = _affine(MOVING_SHAPE, (1.0, 1.1, 1.3), (-10, 6, -4), flip=(-1, 1, 1))
    moving = _content(_grid(MOVING_SHAPE) @ a_m[:3, :3].T + a_m[:3, 3]).astype(np.float32)
    fixed_path = save_image(tmp / "fixed.nii.gz", rng.random(FIXED_SHAPE).astype(np.float32), a_f)
    moving_path = save_image(tmp / "moving.nii.gz", moving, a_m)
    # Work with the affines as stored (float32 sform), which is what ITK reads.
    fixed, moving_vol = load_image(fixed_path), load_image(moving_path)
    u = np.stack([gaussian_filter(rng.normal(size=FIXED_SHAPE), 3.0) for _ in range(3)], -1)
    u *= 2.0 / np.abs(u).max()
    g = grid_to_grid_matrix(fixed.affine, moving_vol.affine)
    x = _grid(FIXED_SHAPE)
    y = (x + u) @ g[:3, :3].T + g[:3, 3]  # fixed voxel -> moving voxel
    d_lps = voxel_disp_to_world(y - x, fixed.affine, moving_vol.affine)
    warp_path = save_itk_warp(tmp / "warp.nii.gz", d_lps, fixed.affine)
    return dict(tmp=tmp, fixed=fixed, moving=moving_vol, fixed_path=fixed_path, moving_path=moving_path,
                x=x, y=y, d_lps=d_lps, warp_path=warp_path)


def _interior(y, shape):
    """Fixed voxels whose moving sample point is >= 1 voxel inside the moving grid.

    Within one voxel of the border jaxreg's zeros padding blends with 0 while
    ITK clamps to the edge value (and returns 0 beyond half a voxel), so only
    the interior is comparable between ``sample(..., padding="zeros")`` and ITK.
    """
    return np.all((y >= 1.0) & (y <= np.asarray(shape) - 2.0), axis=-1)


def test_constant_field_components_are_lps(tmp_path):
    """Evidence for the on-disk convention: ITK reads the stored components as LPS mm."""
    a = np.diag([2.0, 1.5, 1.0, 1.0])  # RAS-aligned axes, anisotropic spacing
    a[:3, 3] = [-10.0, 5.0, 3.0]
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in FIXED_SHAPE], indexing="ij")
    image = i + 100 * j + 10000 * k  # reads back the voxel index it was sampled at
    img_path = save_image(tmp_path / "img.nii.gz", image, a)
    centre = (10, 11, 9)
    for stored, voxel_shift in [((4.0, 0, 0), (-2, 0, 0)), ((0, 3.0, 0), (0, -2, 0)), ((0, 0, 2.0), (0, 0, 2))]:
        # LPS (+4, 0, 0) = RAS (-4, 0, 0) = -2 voxels along axis 0 (2 mm); RAS would give +2.
        d = np.broadcast_to(np.asarray(stored, np.float32), FIXED_SHAPE + (3,))
        warp = save_itk_warp(tmp_path / "const.nii.gz", d, a, overwrite=True)
        out = _ants_warp(img_path, img_path, warp)
        expected = image[centre] + np.dot(voxel_shift, (1, 100, 10000))
        assert out[centre] == pytest.approx(expected, abs=1e-2)
        ours = apply_transform(load_image(img_path), warp, load_image(img_path))
        assert ours[centre] == pytest.approx(expected, abs=1e-2)


def test_ants_reproduces_jaxreg_warp(case):
    y = case["y"]
    moving = case["moving"].data
    ours = np.asarray(sample(jnp.asarray(moving), jnp.asarray(y, jnp.float32), order=1, padding="zeros"))
    theirs = _ants_warp(case["fixed_path"], case["moving_path"], case["warp_path"])
    inner = _interior(y, MOVING_SHAPE)
    assert inner.mean() > 0.5  # the comparison covers most of the fixed grid
    scale = moving.max() - moving.min()
    assert np.abs(ours - theirs)[inner].max() < 1e-3 * scale
    # Negative control: RAS components (no LPS flip) are read wrongly by ITK.
    d_ras = case["d_lps"] * np.array([-1, -1, 1], np.float32)
    wrong = save_itk_warp(case["tmp"] / "warp_ras.nii.gz", d_ras, case["fixed"].affine, overwrite=True)
    bad = _ants_warp(case["fixed_path"], case["moving_path"], wrong)
    assert np.abs(ours - bad)[inner].max() > 0.05 * scale


def test_apply_transform_equals_ants_everywhere(case):
    ours = apply_transform(case["moving"], case["warp_path"], case["fixed"])
    assert ours.shape == FIXED_SHAPE and ours.dtype == np.float32
    theirs = _ants_warp(case["fixed_path"], case["moving_path"], case["warp_path"])
    scale = np.ptp(case["moving"].data)
    # ITK's border rule is emulated, so every voxel is compared, border included.
    assert np.abs(ours - theirs).max() < 1e-3 * scale
    assert (theirs == 0).sum() > 0 and np.array_equal(ours == 0, theirs == 0)


def test_apply_transform_labels_nearest_equals_ants(case, tmp_path):
    labels = (case["moving"].data * 3).round().astype(np.int32) % 5
    lab_path = save_image(tmp_path / "labels.nii.gz", labels, case["moving"].affine, dtype=np.int16)
    ours = apply_transform(Volume(labels, case["moving"].affine), case["warp_path"], case["fixed"], order=0)
    assert ours.dtype == np.int32
    theirs = _ants_warp(case["fixed_path"], lab_path, case["warp_path"], interpolator="nearestNeighbor")
    # Exact ties (a coordinate at k + 0.5) may round differently; allow a handful.
    assert (ours != np.round(theirs)).mean() < 1e-3


def test_load_warp_and_convert_back_recovers_voxel_map(case):
    d_lps, affine = load_itk_warp(case["warp_path"])
    assert d_lps.shape == FIXED_SHAPE + (3,) and d_lps.dtype == np.float32
    np.testing.assert_allclose(affine, case["fixed"].affine, atol=1e-6)
    disp = world_warp_to_voxel_disp(d_lps, affine, case["moving"].affine)
    assert np.abs(disp - (case["y"] - case["x"])).max() < 1e-4
    # Same with an explicit reference equal to the warp grid (goes through field interpolation).
    disp2 = world_warp_to_voxel_disp(d_lps, affine, case["moving"].affine, ref_shape=FIXED_SHAPE,
                                     ref_affine=case["fixed"].affine)
    assert np.abs(disp2 - (case["y"] - case["x"])).max() < 1e-4


def test_reference_grid_larger_than_warp_matches_ants(case, tmp_path):
    """Reference voxels outside the field get zero displacement, as in ITK."""
    ref_shape = (26, 28, 16)
    a_ref = _affine(ref_shape, (1.1, 1.0, 1.8), (3, 4, -6))
    ref_path = save_image(tmp_path / "ref.nii.gz", np.random.default_rng(1).random(ref_shape).astype(np.float32),
                          a_ref)
    ref = load_image(ref_path)
    ours = apply_transform(case["moving"], case["warp_path"], ref)
    theirs = _ants_warp(ref_path, case["moving_path"], case["warp_path"])
    scale = np.ptp(case["moving"].data)
    assert np.abs(ours - theirs).max() < 1e-3 * scale
    # the reference really extends beyond the warp's grid
    g = grid_to_grid_matrix(ref.affine, case["fixed"].affine)
    c = _grid(ref_shape) @ g[:3, :3].T + g[:3, 3]
    outside = ~np.all((c >= -0.5) & (c < np.asarray(FIXED_SHAPE) - 0.5), -1)
    assert outside.mean() > 0.1


def test_reads_warp_written_by_ants(case, tmp_path):
    """A field written by ITK (via antspyx) is read with the same components and grid."""
    fixed_ants = ants.image_read(str(case["fixed_path"]))
    rng = np.random.default_rng(2)
    field = np.stack([gaussian_filter(rng.normal(size=FIXED_SHAPE), 3.0) for _ in range(3)], -1)
    field = (field * 3.0 / np.abs(field).max()).astype(np.float32)  # mm, LPS
    img = ants.from_numpy(field, origin=fixed_ants.origin, spacing=fixed_ants.spacing,
                          direction=fixed_ants.direction, has_components=True)
    path = tmp_path / "ants_warp.nii.gz"
    ants.image_write(img, str(path))
    d_lps, affine = load_itk_warp(path)
    np.testing.assert_allclose(d_lps, field, atol=1e-6)
    np.testing.assert_allclose(affine, case["fixed"].affine, atol=1e-5)
    ours = apply_transform(case["moving"], path, case["fixed"])
    theirs = _ants_warp(case["fixed_path"], case["moving_path"], path)
    assert np.abs(ours - theirs).max() < 1e-3 * np.ptp(case["moving"].data)


def test_warp_validation_errors(case, tmp_path):
    a = case["fixed"].affine
    with pytest.raises(ValueError, match="2D displacement fields are not supported"):
        voxel_disp_to_world(np.zeros((5, 6, 2)), np.eye(4), np.eye(4))
    with pytest.raises(ValueError, match="2D displacement fields are not supported"):
        save_itk_warp(tmp_path / "w2d.nii.gz", np.zeros((5, 6, 2)), np.eye(4))
    sheared = np.eye(4)
    sheared[0, 1] = 0.2
    with pytest.raises(ValueError, match="not orthogonal"):
        save_itk_warp(tmp_path / "ws.nii.gz", np.zeros((5, 6, 7, 3)), sheared)
    with pytest.raises(FileExistsError):
        save_itk_warp(case["warp_path"], case["d_lps"], a)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_itk_warp(tmp_path / "nope.nii.gz")
    save_image(tmp_path / "four_d.nii.gz", np.zeros((5, 6, 7, 3), np.float32), a, intent="vector")
    with pytest.raises(ValueError, match=r"\(X, Y, Z, 1, 3\), got \(5, 6, 7, 3\)"):
        load_itk_warp(tmp_path / "four_d.nii.gz")
    save_image(tmp_path / "w2.nii.gz", np.zeros((5, 6, 1, 1, 2), np.float32), a, intent="vector")
    with pytest.raises(ValueError, match="2D warps are not supported"):
        load_itk_warp(tmp_path / "w2.nii.gz")
    save_image(tmp_path / "no_intent.nii.gz", np.zeros((5, 6, 7, 1, 3), np.float32), a)
    with pytest.raises(ValueError, match="intent_code is 0"):
        load_itk_warp(tmp_path / "no_intent.nii.gz")
    img2d = Volume(np.ones((5, 6), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="2D is not supported"):
        apply_transform(img2d, case["warp_path"], case["fixed"])
    with pytest.raises(ValueError, match="both ref_shape and ref_affine"):
        world_warp_to_voxel_disp(case["d_lps"], a, a, ref_shape=FIXED_SHAPE)
