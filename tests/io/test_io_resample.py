"""resample_to_grid / grid_to_grid_matrix: exact oracles for permutations, flips, shifts."""
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from jaxreg.io import grid_to_grid_matrix, resample_to_grid


def _oblique(spacing=(1.2, 0.9, 1.5)):
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    a[:3, 3] = [-12.0, 7.5, 3.0]
    return a


def _rotation_about(center, angles, shift=(0.0, 0.0, 0.0)):
    """(4, 4) voxel map: rotate by Euler ``angles`` (radians) about ``center``, then shift."""
    m = np.eye(4)
    m[:3, :3] = Rotation.from_euler("xyz", angles).as_matrix()
    m[:3, 3] = np.asarray(center) + np.asarray(shift) - m[:3, :3] @ np.asarray(center)
    return m


def _flip_axis0(affine, n):
    """Affine of the same world content after ``data[::-1]`` along axis 0."""
    f = np.eye(4)
    f[0, 0], f[0, 3] = -1.0, n - 1
    return affine @ f


def _permute(affine, perm):
    """Affine of the same content after ``np.transpose(data, perm)``."""
    p = np.eye(4)
    p[:3, :3] = np.eye(3)[:, perm]
    return affine @ p


@pytest.fixture
def image():
    return np.random.default_rng(0).normal(size=(9, 10, 11)).astype(np.float32)


def test_grid_to_grid_matrix_definition():
    a_ref, a_img = _oblique(), _flip_axis0(_oblique((2.0, 1.0, 0.5)), 7)
    m = grid_to_grid_matrix(a_ref, a_img)
    x = np.array([3.0, -1.0, 2.5, 1.0])
    np.testing.assert_allclose(a_img @ (m @ x), a_ref @ x, atol=1e-12)  # same world point
    np.testing.assert_allclose(grid_to_grid_matrix(a_ref, a_ref), np.eye(4), atol=1e-12)
    with pytest.raises(ValueError, match="not invertible"):
        grid_to_grid_matrix(a_ref, np.diag([1.0, 0.0, 1.0, 1.0]))


def test_identity_when_grids_equal(image):
    out = resample_to_grid(image, _oblique(), image.shape, _oblique())
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize("order", [0, 1])
def test_flip_and_permutation_resample_back_exactly(image, order):
    a = _oblique()
    flipped = image[::-1]
    np.testing.assert_array_equal(
        resample_to_grid(flipped, _flip_axis0(a, image.shape[0]), image.shape, a, order=order), image)
    perm = (2, 0, 1)
    transposed = np.transpose(image, perm)
    np.testing.assert_array_equal(
        resample_to_grid(transposed, _permute(a, perm), image.shape, a, order=order), image)


def test_integer_translation_is_an_exact_shift(image):
    a = _oblique()
    shifted_affine = a.copy()
    shifted_affine[:3, 3] += a[:3, :3] @ np.array([2.0, -1.0, 3.0])  # image voxel 0 sits at ref voxel (2, -1, 3)
    out = resample_to_grid(image, shifted_affine, image.shape, a)
    # ref voxel x samples image voxel x - (2, -1, 3)
    expected = np.zeros_like(image)
    expected[2:, :-1, 3:] = image[:-2, 1:, :-3]
    np.testing.assert_array_equal(out, expected)


def test_matrix_is_applied_first_in_reference_voxels(image):
    a_ref = _oblique()
    a_img = _flip_axis0(a_ref, image.shape[0])
    flipped = image[::-1]
    m = np.eye(4)
    m[:3, 3] = [1.0, 0.0, -2.0]  # sample the reference's content at x + (1, 0, -2)
    out = resample_to_grid(flipped, a_img, image.shape, a_ref, matrix=m)
    expected = np.zeros_like(image)
    expected[:-1, :, 2:] = image[1:, :, :-2]
    np.testing.assert_array_equal(out, expected)
    # a rotation about the centre, composed: matches direct sampling at M x
    rot = _rotation_about((np.array(image.shape) - 1) / 2, (0.1, -0.2, 0.15))
    a = resample_to_grid(flipped, a_img, image.shape, a_ref, matrix=rot)
    b = resample_to_grid(image, a_ref, image.shape, a_ref, matrix=rot)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_labels_nearest_keep_dtype_and_values():
    labels = np.random.default_rng(0).integers(0, 5, size=(6, 7, 8)).astype(np.int32)
    a = _oblique()
    rot = _rotation_about((2.5, 3, 3.5), (0.2, 0.0, 0.0), shift=(0.3, 0.0, 0.0))
    out = resample_to_grid(labels, a, labels.shape, a, order=0, matrix=rot)
    assert out.dtype == np.int32
    assert set(np.unique(out)) <= set(np.unique(labels))


def test_channels_last(image):
    multi = np.stack([image, 2 * image], axis=-1)
    a = _oblique()
    out = resample_to_grid(multi[::-1], _flip_axis0(a, image.shape[0]), image.shape, a)
    np.testing.assert_array_equal(out, multi)


def test_2d_flip_and_plane_check():
    img = np.random.default_rng(0).normal(size=(6, 7)).astype(np.float32)
    a = _oblique()
    np.testing.assert_array_equal(resample_to_grid(img[::-1], _flip_axis0(a, 6), img.shape, a), img)
    m = np.array([[1.0, 0, 1], [0, 1, 0], [0, 0, 1]])  # 2D matrices are (3, 3)
    expected = np.zeros_like(img)
    expected[:-1] = img[1:]
    np.testing.assert_array_equal(resample_to_grid(img, a, img.shape, a, matrix=m), expected)
    other_plane = a.copy()
    other_plane[:3, 3] += a[:3, 2] * 2.0  # two slices up
    with pytest.raises(ValueError, match="different planes"):
        resample_to_grid(img, other_plane, img.shape, a)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((np.zeros((4, 5, 6, 2, 3)), np.eye(4), (4, 5, 6), np.eye(4)), {}, "spatial axes"),
        ((np.zeros((4, 5, 6)), np.eye(4), (4, 5, 6), np.eye(4)), {"order": 3}, "order"),
        ((np.zeros((4, 5, 6)), np.eye(4), (4, 5, 6), np.eye(4)), {"matrix": np.eye(3)}, r"\(4, 4\)"),
        ((np.zeros((4, 5, 6)), np.eye(4), (4, 5, 6, 7), np.eye(4)), {}, "ref_shape"),
    ],
)
def test_resample_rejects_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        resample_to_grid(*args, **kwargs)
