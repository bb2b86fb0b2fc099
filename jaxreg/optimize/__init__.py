"""Instance (per-pair) optimisation."""
from jaxreg.optimize.instance import (
    DNS_CONFIG,
    SIMILARITIES,
    TRANSFORMS,
    InstanceConfig,
    InstanceResult,
    center_of_mass,
    gaussian_blur,
    normalize_intensity,
    register_instance,
    similarity_fn,
)

__all__ = ["DNS_CONFIG", "SIMILARITIES", "TRANSFORMS", "InstanceConfig", "InstanceResult", "center_of_mass", "gaussian_blur",
           "normalize_intensity", "register_instance", "similarity_fn"]
