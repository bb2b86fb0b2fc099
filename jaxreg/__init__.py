"""jaxreg: multi-modal deformable image registration with learned similarity, in JAX.

Curated public API (``import jaxreg as jr``)::

    jr.spatial     grids, warp, compose, invert, integrate (scaling and squaring), affine
    jr.losses      mse, lncc, mutual_information, nmi, local_mi, mind_ssc, ngf, regularisers
    jr.metrics     dice, dice30, hd95, jacobian_det, folding_percent, sdlogj, endpoint_error
    jr.optimize    register_instance (multi-level instance optimisation)
    jr.io          NIfTI load/save, world-space resampling, ITK/ANTs warps
    jr.augment     random smooth deformations

Conventions (docs/design.md): images ``(*spatial, C)``; displacements
``(*spatial, D)`` in voxels of the fixed grid; ``warped(x) = moving(x + u(x))``.
"""
from jaxreg import augment, io, losses, metrics, optimize, spatial
from jaxreg.optimize import InstanceConfig, register_instance
from jaxreg.spatial import compose, integrate, invert, warp, warp_labels

__version__ = "0.1.0"

__all__ = ["augment", "io", "losses", "metrics", "optimize", "spatial", "InstanceConfig", "register_instance",
           "compose", "integrate", "invert", "warp", "warp_labels", "__version__"]
