"""Real data: native TCGA scans on different grids line up through their affines, in ANTs too."""
import numpy as np
import pytest

from jaxreg.io import (
    apply_transform,
    grid_to_grid_matrix,
    load_image,
    resample_to_grid,
    save_itk_warp,
    voxel_disp_to_world,
)

ants = pytest.importorskip("ants")


@pytest.mark.slow
@pytest.mark.realdata
def test_native_t2_into_t1_grid_matches_ants(data_dir, tmp_path):
    folder = data_dir / "native" / "tcga_fg6692"
    t1_path, t2_path = folder / "t1.nii.gz", folder / "t2.nii.gz"
    t1, t2 = load_image(t1_path), load_image(t2_path)
    assert t1.data.shape != t2.data.shape  # really different grids (256x224x26 vs 224x256x26)

    ours = resample_to_grid(t2.data, t2.affine, t1.data.shape, t1.affine, matrix=np.eye(4))
    assert ours.shape == t1.data.shape

    # The same map as a warp: identity in world space, y = G x in voxels.
    g = grid_to_grid_matrix(t1.affine, t2.affine)
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in t1.data.shape], indexing="ij"), -1)
    y = x @ g[:3, :3].T + g[:3, 3]
    d_lps = voxel_disp_to_world(y - x, t1.affine, t2.affine)
    assert np.abs(d_lps).max() < 1e-3  # no motion: the world displacement is ~0 mm
    warp = save_itk_warp(tmp_path / "identity_warp.nii.gz", d_lps, t1.affine)

    theirs = ants.apply_transforms(fixed=ants.image_read(str(t1_path)), moving=ants.image_read(str(t2_path)),
                                   transformlist=[str(warp)], interpolator="linear").numpy()
    # Compare where the sample point is > 1 voxel inside t2 (zeros vs ITK border rule differ at the edge).
    inner = np.all((y > 1.0) & (y < np.asarray(t2.data.shape) - 2.0), axis=-1)
    assert inner.mean() > 0.2, inner.mean()
    scale = np.ptp(t2.data)
    assert np.abs(ours - theirs)[inner].max() < 1e-3 * scale
    # jaxreg apply (ITK border rule) agrees everywhere.
    applied = apply_transform(t2, warp, t1)
    assert np.abs(applied - theirs).max() < 1e-3 * scale
    # and the images are not trivially zero where compared
    assert np.abs(theirs[inner]).max() > 0.1 * scale
