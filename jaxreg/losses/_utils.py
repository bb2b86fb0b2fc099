"""Private helpers shared by the similarity losses: checks, masks, safe maths.

Everything here runs at trace time (shape checks) or is elementwise and
NaN-safe (the double-``where`` trick), so the public losses stay small.
"""
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

Image = Float[Array, "*spatial C"]
Weights = Float[Array, "*spatial"]
Mask = Optional[
    Union[
        Bool[Array, "*spatial"],
        Float[Array, "*spatial"],
        Bool[Array, "*spatial 1"],
        Float[Array, "*spatial 1"],
    ]
]


def _as_float(x) -> Array:
    """Returns ``x`` as a JAX array with a floating dtype (ints -> float32)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x


def _check_image(x, name: str) -> tuple[Array, tuple[int, ...]]:
    """Checks that ``x`` is a ``(*spatial, C)`` image with 2 or 3 spatial axes."""
    x = _as_float(x)
    if x.ndim not in (3, 4):
        raise ValueError(
            f"{name} must be (*spatial, C) with 2 or 3 spatial axes, got shape "
            f"{x.shape} (ndim {x.ndim}); add a trailing channel axis if needed"
        )
    return x, tuple(x.shape[:-1])


def _check_pair(
    fixed, moving, names: tuple[str, str] = ("fixed", "moving")
) -> tuple[Array, Array, tuple[int, ...]]:
    """Checks a (fixed, moving) pair of images; returns them as floats."""
    fixed, spatial = _check_image(fixed, names[0])
    moving, _ = _check_image(moving, names[1])
    if fixed.shape != moving.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape, got "
            f"{fixed.shape} and {moving.shape}"
        )
    dtype = jnp.result_type(fixed.dtype, moving.dtype)
    return fixed.astype(dtype), moving.astype(dtype), spatial


def _mask_weights(mask, spatial: tuple[int, ...], dtype) -> Weights:
    """Turns ``mask`` (None, ``(*spatial)`` or ``(*spatial, 1)``) into weights.

    Returns float weights of shape ``spatial`` (ones when ``mask`` is None).
    """
    if mask is None:
        return jnp.ones(spatial, dtype)
    mask = jnp.asarray(mask)
    if mask.shape == spatial + (1,):
        mask = mask[..., 0]
    if mask.shape != spatial:
        raise ValueError(
            f"mask must have shape {spatial} or {spatial + (1,)}, got {mask.shape}"
        )
    return mask.astype(dtype)


def _check_int(value, name: str, *, minimum: int, odd: bool = False) -> int:
    """Checks a static integer hyperparameter (window, bins, radius, ...)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"{name} must be a Python int (static under jit), got "
            f"{type(value).__name__} {value!r}"
        )
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if odd and value % 2 == 0:
        raise ValueError(f"{name} must be odd, got {value}")
    return value


def _safe_div(num: Array, den: Array) -> Array:
    """``num / den`` where ``den > 0``, else 0, with finite gradients."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def _safe_sqrt(x: Array) -> Array:
    """``sqrt(x)`` for ``x > 0``, else 0; gradient 0 (not inf) at 0."""
    ok = x > 0
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, x, 1)), 0)


def _xlogx(p: Array) -> Array:
    """``p * log(p)`` with the limit 0 at ``p = 0`` and finite gradients."""
    ok = p > 0
    return jnp.where(ok, p * jnp.log(jnp.where(ok, p, 1)), 0)


def _weighted_mean(values: Array, weights: Weights) -> Array:
    """Weighted mean over the spatial axes; trailing axes are averaged plainly.

    ``values`` is ``(*spatial, ...)`` and ``weights`` is ``(*spatial)``.
    Returns 0 when all weights are 0.
    """
    trailing = tuple(range(weights.ndim, values.ndim))
    per_voxel = jnp.mean(values, axis=trailing) if trailing else values
    return _safe_div(jnp.sum(weights * per_voxel), jnp.sum(weights))


def _window_sum_1d(x: Array, size: int, axis: int, padding) -> Array:
    """Sum over a window of ``size`` voxels along one axis (``reduce_window``)."""
    window = [1] * x.ndim
    window[axis] = size
    return jax.lax.reduce_window(
        x,
        np.zeros((), x.dtype),  # concrete 0: lowers to the differentiable window sum
        jax.lax.add,
        window_dimensions=tuple(window),
        window_strides=(1,) * x.ndim,
        padding=padding,
    )


def _box_sum(x: Array, size: int) -> Array:
    """Sum over a centred cube of side ``size`` (odd) on the spatial axes of
    ``(*spatial, C)``, zero padding ('SAME'); output has the input's shape.

    Separable: one 1D window sum per axis, ``D * size`` adds per voxel instead
    of ``size^D``.
    """
    for axis in range(x.ndim - 1):
        x = _window_sum_1d(x, size, axis, "SAME")
    return x


def _box_mean_edge(x: Array, size: int) -> Array:
    """Mean over a centred cube of side ``size`` (odd) on the spatial axes of
    ``(*spatial, C)`` with edge-replicate padding (as ``ReplicationPad`` +
    ``avg_pool`` in PyTorch). Separable, like :func:`_box_sum`."""
    d = x.ndim - 1
    r = size // 2
    x = jnp.pad(x, [(r, r)] * d + [(0, 0)], mode="edge")
    for axis in range(d):
        x = _window_sum_1d(x, size, axis, "VALID")
    return x / size**d
