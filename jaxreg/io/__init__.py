"""File I/O: NIfTI images with their affines, and ITK/ANTs-compatible warps.

The only subpackage (with :mod:`jaxreg.data`) that touches the file system.
World space is RAS+ mm inside jaxreg; ITK warps on disk are LPS (see
:mod:`jaxreg.io.transforms`).
"""
from jaxreg.io.nifti import Volume, grid_to_grid_matrix, load_image, load_labels, resample_to_grid, save_image
from jaxreg.io.transforms import (
    apply_transform,
    load_itk_warp,
    save_itk_warp,
    voxel_disp_to_world,
    world_warp_to_voxel_disp,
)

__all__ = [
    "Volume", "load_image", "load_labels", "save_image", "resample_to_grid", "grid_to_grid_matrix",
    "voxel_disp_to_world", "world_warp_to_voxel_disp", "save_itk_warp", "load_itk_warp", "apply_transform",
]
