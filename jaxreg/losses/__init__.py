"""Similarity losses and regularisers.

Every similarity takes one unbatched pair of ``(*spatial, C)`` images
(``D = len(spatial)`` in {2, 3}; batch with ``jax.vmap``), an optional
``mask``, and returns a scalar to minimise. Static hyperparameters (window,
bins, patch, radius, dilation) are keyword-only Python ints.

``SIMILARITIES`` maps short names to the losses with their defaults, all
callable as ``loss(fixed, moving, *, mask=None)``.
"""
from typing import Callable

from jaxreg.losses.dns import cosine_similarity_loss, dns, dns_pairs
from jaxreg.losses.deepsim import deepsim
from jaxreg.losses.infonce import infonce, patchnce, resize_mask, sample_in_mask
from jaxreg.losses.lncc import lncc
from jaxreg.losses.local_mi import local_mi
from jaxreg.losses.mi import mi_of_sample_groups, mi_of_samples, mutual_information, nmi, parzen_weights
from jaxreg.losses.mind import MIND_SSC_CHANNELS, descriptor_mse, mind_loss, mind_ssc
from jaxreg.losses.mse import mse
from jaxreg.losses.ngf import ngf
from jaxreg.losses.regularizers import bending_energy, diffusion, velocity_l2

SIMILARITIES: dict[str, Callable] = {
    "mse": mse,
    "lncc": lncc,
    "mi": mutual_information,
    "nmi": nmi,
    "local_mi": local_mi,
    "mind": mind_loss,
    "ngf": ngf,
}

__all__ = [
    "SIMILARITIES",
    "bending_energy",
    "cosine_similarity_loss",
    "deepsim",
    "descriptor_mse",
    "diffusion",
    "dns",
    "dns_pairs",
    "infonce",
    "lncc",
    "local_mi",
    "mind_loss",
    "mind_ssc",
    "MIND_SSC_CHANNELS",
    "mse",
    "mutual_information",
    "ngf",
    "nmi",
    "mi_of_sample_groups",
    "mi_of_samples",
    "parzen_weights",
    "patchnce",
    "resize_mask",
    "sample_in_mask",
    "velocity_l2",
]
