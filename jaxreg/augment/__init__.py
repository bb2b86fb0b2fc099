"""Data augmentation (keyed, jittable): random deformations, affine, flips; gamma, bias field, noise, Bezier curves (DNS), random convolutions (CAR)."""
from jaxreg.augment.deform import random_deformation, random_velocity
from jaxreg.augment.intensity import (bezier_control_points, bezier_curve, random_bezier, random_bias_field, random_convolution,
                                     random_gamma, random_noise)
from jaxreg.augment.spatial import random_affine, random_affine_matrix, random_flip, random_svf

__all__ = ["bezier_control_points", "bezier_curve", "random_affine", "random_bezier", "random_affine_matrix", "random_bias_field", "random_convolution", "random_deformation", "random_flip",
           "random_gamma", "random_noise", "random_svf", "random_velocity"]
