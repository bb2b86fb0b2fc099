"""Rigid and affine registration recover known transforms of a real scan on another oblique grid (exact truth).

The moving scan is the fixed scan's content moved by a known world transform
``T`` and resampled (cubic) onto a new oblique grid with another voxel size,
so the true map from fixed to moving world points is ``T`` (a moving point
``q`` shows the fixed content at ``T^-1 q``). The scored
error is the distance between the recovered and the true moving point of
every head voxel, and the rotation angle between the two linear parts.
"""
import numpy as np
import pytest
import scipy.ndimage as ndi
from scipy.spatial.transform import Rotation

from jaxreg.io import Volume, load_image
from jaxreg.pipeline import config_for, register_volumes
from jaxreg.spatial import identity_grid


def _world_transform(rotvec_deg, translation_mm, center, scale=None):
    t = np.eye(4)
    lin = Rotation.from_rotvec(np.deg2rad(rotvec_deg)).as_matrix()
    if scale is not None:
        lin = lin @ np.asarray(scale)
    t[:3, :3] = lin
    t[:3, 3] = center + np.asarray(translation_mm) - lin @ center
    return t


def _moved_scan(fixed: Volume, transform: np.ndarray, spacing, tilt_deg) -> Volume:
    """``fixed`` content moved by the world map ``transform`` on a new grid tilted by ``tilt_deg``."""
    shape_f = np.asarray(fixed.data.shape)
    center = fixed.affine[:3, :3] @ ((shape_f - 1) / 2) + fixed.affine[:3, 3]
    extent = np.abs(fixed.affine[:3, :3]) @ shape_f
    shape = tuple(int(np.ceil(e / s)) + 8 for e, s in zip(extent, spacing))
    direction = Rotation.from_rotvec(np.deg2rad(tilt_deg)).as_matrix()
    aff = np.eye(4)
    aff[:3, :3] = direction @ np.diag(spacing)
    aff[:3, 3] = center - aff[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    # moving voxel v holds the fixed content at world T^-1 (A_m v)
    x = np.asarray(identity_grid(shape), np.float64).reshape(-1, 3)
    world = x @ aff[:3, :3].T + aff[:3, 3]
    src = world @ np.linalg.inv(transform)[:3, :3].T + np.linalg.inv(transform)[:3, 3]
    inv_f = np.linalg.inv(fixed.affine)
    vox = src @ inv_f[:3, :3].T + inv_f[:3, 3]
    data = ndi.map_coordinates(fixed.data.astype(np.float32), vox.T, order=3, mode="constant", cval=0.0)
    return Volume(np.maximum(data.reshape(shape), 0).astype(np.float32), aff)


def _errors(reg, fixed, moving, transform):
    """(mean mm, max mm over the head, rotation error in degrees) of the recovered map against ``T``."""
    x = np.asarray(identity_grid(fixed.data.shape), np.float64)
    world = x @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]
    truth_m = transform
    truth = world @ truth_m[:3, :3].T + truth_m[:3, 3]
    est = (x + reg.voxel_map_disp) @ moving.affine[:3, :3].T + moving.affine[:3, 3]
    head = ndi.binary_fill_holes(fixed.data > 0.1 * np.percentile(fixed.data, 99))
    dist = np.linalg.norm(est - truth, axis=-1)[head]
    # world-space linear part of the recovered map: least squares over the head voxels
    pts = np.concatenate([world[head], np.ones((int(head.sum()), 1))], 1)
    lin = np.linalg.lstsq(pts, est[head], rcond=None)[0][:3].T
    u, _, vt = np.linalg.svd(lin @ np.linalg.inv(truth_m[:3, :3]))
    angle = np.rad2deg(Rotation.from_matrix(u @ vt).magnitude())
    return float(dist.mean()), float(dist.max()), float(angle)


@pytest.fixture(scope="module")
def fixed_scan(data_dir):
    # IXI002's T1: skull-stripped, on an oblique 1.2 x 0.94 x 0.94 mm grid (registered on the 2 mm working grid)
    return load_image(data_dir / "ixi_t2" / "IXI002" / "t1.nii.gz")


CASES = [  # (rotation vector in degrees, translation mm, moving voxel size mm, grid tilt in degrees)
    ((11.0, -8.0, 13.0), (14.0, -11.0, 9.0), (1.3, 1.1, 1.5), (10.0, -15.0, 5.0)),
    ((-5.0, 16.0, -8.0), (-18.0, 6.0, -12.0), (1.5, 1.5, 1.2), (-20.0, 8.0, 12.0)),
]


@pytest.mark.slow
@pytest.mark.parametrize("rotvec, translation, spacing, tilt", CASES)
def test_rigid_recovers_known_rotation_and_translation(fixed_scan, rotvec, translation, spacing, tilt):
    assert np.linalg.norm(rotvec) <= 20.0 and np.linalg.norm(translation) <= 25.0
    fixed = fixed_scan
    center = fixed.affine[:3, :3] @ ((np.asarray(fixed.data.shape) - 1) / 2) + fixed.affine[:3, 3]
    transform = _world_transform(rotvec, translation, center)
    moving = _moved_scan(fixed, transform, spacing, tilt)
    reg = register_volumes(fixed, moving, config=config_for("io-mind", transform="rigid"), resolution=2.0)
    mean, worst, angle = _errors(reg, fixed, moving, transform)
    print(f"rigid {rotvec} {translation}: mean {mean:.3f} mm, max {worst:.3f} mm, rotation {angle:.3f} deg")
    assert mean < 0.2 and angle < 0.2, (mean, worst, angle)


@pytest.mark.slow
def test_affine_recovers_known_affine(fixed_scan):
    fixed = fixed_scan
    center = fixed.affine[:3, :3] @ ((np.asarray(fixed.data.shape) - 1) / 2) + fixed.affine[:3, 3]
    scale = np.array([[1.08, 0.04, 0.0], [0.0, 0.93, -0.03], [0.0, 0.0, 1.05]])
    transform = _world_transform((8.0, 6.0, -10.0), (10.0, -8.0, 6.0), center, scale=scale)
    moving = _moved_scan(fixed, transform, (1.4, 1.2, 1.3), (6.0, 10.0, -8.0))
    reg = register_volumes(fixed, moving, config=config_for("io-mind", transform="affine"), resolution=2.0)
    mean, worst, _ = _errors(reg, fixed, moving, transform)
    print(f"affine: mean {mean:.3f} mm, max {worst:.3f} mm")
    assert mean < 0.3, (mean, worst)
