"""Keyed, jittable spatial augmentation applied consistently to an image and its labels.

Every function takes ``key`` and one unbatched ``(*spatial, C)`` image
(``D = len(spatial)`` in {2, 3}) with optional ``(*spatial)`` integer labels,
and returns ``(image, labels, disp)``: the augmented image (linear
interpolation, zeros outside), the labels moved by the same map (nearest
neighbour; None if not given) and the displacement ``disp`` (voxels) with
``out(x) = in(x + disp(x))``. Range arguments are Python floats (static).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from jaxreg.augment.deform import random_deformation
from jaxreg.spatial import affine_to_disp, params_to_matrix, warp, warp_labels
from jaxreg.spatial.affine import num_params


def _check(image, labels):
    d = image.ndim - 1
    if d not in (2, 3):
        raise ValueError(f"image must be (*spatial, C) with 2 or 3 spatial axes, got {image.shape}")
    if labels is not None and labels.shape != image.shape[:-1]:
        raise ValueError(f"labels {labels.shape} must match the image's spatial shape {image.shape[:-1]}")
    return d


def _apply(image, labels, disp):
    out = warp(image, disp, padding="zeros")
    return out, (None if labels is None else warp_labels(labels, disp)), disp


def random_affine_matrix(key: PRNGKeyArray, shape, *, rotation: float = 10.0, translation: float = 0.0,
                         scale: float = 0.1, shear: float = 0.0) -> Float[Array, "D+1 D+1"]:
    """A random affine about the grid centre: angles ``U(-rotation, rotation)`` degrees,
    translations ``U(-translation, translation)`` voxels, scales ``U(1 - scale, 1 + scale)``,
    shears ``U(-shear, shear)``. Returns ``(D+1, D+1)`` float32 (output voxel -> input voxel)."""
    d = len(shape)
    n = num_params(d)
    k = jax.random.split(key, 4)
    t = jax.random.uniform(k[0], (n["translation"],), minval=-translation, maxval=translation)
    r = jnp.deg2rad(jax.random.uniform(k[1], (n["rotation"],), minval=-rotation, maxval=rotation))
    s = jax.random.uniform(k[2], (n["scale"],), minval=1.0 - scale, maxval=1.0 + scale)
    sh = jax.random.uniform(k[3], (n["shear"],), minval=-shear, maxval=shear)
    center = jnp.asarray([(v - 1) / 2.0 for v in shape], jnp.float32)
    return params_to_matrix(jnp.concatenate([t, r, s, sh]), ndim=d, center=center)


def random_affine(key: PRNGKeyArray, image: Float[Array, "*spatial C"], labels: Int[Array, "*spatial"] | None = None,
                  *, rotation: float = 10.0, translation: float = 0.0, scale: float = 0.1, shear: float = 0.0):
    """Random affine transform of ``image`` (and ``labels``); see :func:`random_affine_matrix`.

    Raises:
      ValueError: bad ranks or mismatched labels.
    """
    _check(image, labels)
    m = random_affine_matrix(key, image.shape[:-1], rotation=rotation, translation=translation, scale=scale,
                             shear=shear)
    return _apply(image, labels, affine_to_disp(m, image.shape[:-1]))


def random_svf(key: PRNGKeyArray, image: Float[Array, "*spatial C"], labels: Int[Array, "*spatial"] | None = None,
               *, mean_magnitude: float = 2.0, control_spacing: int = 16):
    """Random smooth diffeomorphism (an integrated random SVF, :func:`jaxreg.augment.random_deformation`)."""
    _check(image, labels)
    disp, _ = random_deformation(key, image.shape[:-1], mean_magnitude=mean_magnitude,
                                 control_spacing=control_spacing)
    return _apply(image, labels, disp)


def random_flip(key: PRNGKeyArray, image: Float[Array, "*spatial C"], labels: Int[Array, "*spatial"] | None = None,
                *, axes=None, p: float = 0.5):
    """Flip each axis in ``axes`` (default all spatial axes) independently with probability ``p``.

    Returns ``(image, labels, flips)`` with ``flips`` a ``(len(axes),)`` bool array.
    """
    d = _check(image, labels)
    axes = tuple(range(d)) if axes is None else tuple(axes)
    flips = jax.random.bernoulli(key, p, (len(axes),))
    for k, ax in enumerate(axes):
        image = jnp.where(flips[k], jnp.flip(image, ax), image)
        if labels is not None:
            labels = jnp.where(flips[k], jnp.flip(labels, ax), labels)
    return image, labels, flips
