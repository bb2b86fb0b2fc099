"""Geometry: grids, warps, composition, integration, affine transforms, thin-plate splines."""
from jaxreg.spatial.affine import (
    affine_to_disp,
    fit_affine,
    fit_rigid,
    identity_params,
    matrix_to_params,
    num_params,
    params_to_matrix,
)
from jaxreg.spatial.compose import compose, invert, resize_disp
from jaxreg.spatial.filters import gaussian_blur, gaussian_downsample
from jaxreg.spatial.grid import identity_grid, voxel_spacing, voxel_to_world, world_to_voxel
from jaxreg.spatial.integrate import integrate
from jaxreg.spatial.tps import TPS, tps_disp, tps_kernel, tps_solve, tps_transform
from jaxreg.spatial.warp import sample, warp, warp_labels

__all__ = [
    "affine_to_disp", "fit_affine", "fit_rigid", "identity_params", "matrix_to_params", "num_params", "params_to_matrix",
    "compose", "invert", "resize_disp", "gaussian_blur", "gaussian_downsample", "identity_grid", "voxel_spacing", "voxel_to_world", "world_to_voxel",
    "integrate", "sample", "warp", "warp_labels", "TPS", "tps_disp", "tps_kernel", "tps_solve", "tps_transform",
]
