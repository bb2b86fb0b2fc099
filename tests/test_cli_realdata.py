"""End-to-end `jaxreg register` on real scans from ../shared/data (slow)."""
import json

import jax
import nibabel as nib
import numpy as np
import pytest

from jaxreg.cli import main
from jaxreg.io import load_image, save_image
from jaxreg.pipeline import resample_smooth, working_grid

pytestmark = [pytest.mark.slow, pytest.mark.realdata]


def _ants_reproduces(fixed_path, moving_path, out):
    """Max |ours - ANTs| / range over voxels whose sample point lies > 1 voxel inside the moving scan.

    Within one voxel of the moving scan's border ITK's half-voxel rule and our
    zero padding legitimately differ (see jaxreg/io/transforms.py).
    """
    ants = pytest.importorskip("ants")
    from jaxreg.io import load_itk_warp, world_warp_to_voxel_disp

    ours = nib.load(str(out / "warped.nii.gz")).get_fdata()
    theirs = ants.apply_transforms(ants.image_read(str(fixed_path)), ants.image_read(str(moving_path)),
                                   [str(out / "warp.nii.gz")]).numpy()
    moving = nib.load(str(moving_path))
    d_lps, warp_affine = load_itk_warp(out / "warp.nii.gz")
    disp = world_warp_to_voxel_disp(d_lps, warp_affine, moving.affine)
    y = np.indices(ours.shape).transpose(1, 2, 3, 0) + disp
    inside = np.all((y >= 1) & (y <= np.asarray(moving.shape[:3]) - 2), axis=-1)
    assert inside.mean() > 0.3
    return float(np.max(np.abs(ours - theirs)[inside]) / np.ptp(ours))


def brats_known_deformation(data_dir, tmp_path):
    """``(fixed_path, moving_path, fixed, affine, disp_true)``: tcga_fg6692 T1 and its T2 warped by a known
    smooth deformation (2 mm grid; ``moving(x + disp_true(x)) = T2(x)``)."""
    from jaxreg.augment import random_deformation
    from jaxreg.spatial import warp

    src = data_dir / "brats_space" / "tcga_fg6692"
    t1 = load_image(src / "t1.nii.gz")
    t2 = load_image(src / "t2.nii.gz")
    shape, affine, _ = working_grid(t1.data.shape, t1.affine, 2.0)
    fixed = np.asarray(resample_smooth(t1, shape, affine))[..., 0]
    t2_2mm = np.asarray(resample_smooth(t2, shape, affine))
    disp_true, inv_true = random_deformation(jax.random.key(0), shape, mean_magnitude=1.25, control_spacing=16)
    moving = np.asarray(warp(t2_2mm, inv_true))[..., 0]
    fixed_path = save_image(tmp_path / "t1_2mm.nii.gz", fixed, affine)
    moving_path = save_image(tmp_path / "t2_2mm_deformed.nii.gz", np.maximum(moving, 0), affine)
    return fixed_path, moving_path, fixed, affine, np.asarray(disp_true)


def test_known_deformation_brats_t2_to_t1(data_dir, tmp_path):
    """brats_space T2 warped by a known smooth deformation, registered to T1 at 2 mm."""
    fixed_path, moving_path, _, _, _ = brats_known_deformation(data_dir, tmp_path)
    out = tmp_path / "out"
    assert main(["register", "--fixed", str(fixed_path), "--moving", str(moving_path), "--out", str(out),
                 "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["folding_percent"] < 0.5
    assert metrics["similarity_after"] < metrics["similarity_before"]
    assert _ants_reproduces(fixed_path, moving_path, out) < 1e-3


def test_native_tcga_t2_to_t1_world_space(data_dir, tmp_path):
    """Native scans on different grids/orientations come out aligned through their affines."""
    src = data_dir / "native" / "tcga_fg6692"
    fixed_path, moving_path = src / "t1.nii.gz", src / "t2.nii.gz"
    out = tmp_path / "out"
    assert main(["register", "--fixed", str(fixed_path), "--moving", str(moving_path), "--out", str(out),
                 "--method", "io-mi", "--quiet"]) == 0
    fixed = nib.load(str(fixed_path))
    warped = nib.load(str(out / "warped.nii.gz"))
    assert warped.shape == fixed.shape
    np.testing.assert_allclose(warped.affine, fixed.affine, atol=1e-4)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["similarity_after"] < metrics["similarity_before"]
    assert metrics["folding_percent"] < 0.5
    assert _ants_reproduces(fixed_path, moving_path, out) < 1e-3
