"""Data augmentation: random deformations (more in later issues)."""
from jaxreg.augment.deform import random_deformation, random_velocity

__all__ = ["random_deformation", "random_velocity"]
