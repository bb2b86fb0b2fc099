"""Resampling of images and label maps by a displacement field.

Convention (docs/design.md): ``phi(x) = x + u(x)`` and warping pulls back,
``warped(x) = moving(phi(x))``: at voxel ``x`` of the fixed grid the warped
image holds the moving image's value at ``x + u(x)`` (moving voxel units).
"""
import functools
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.ndimage import map_coordinates
from jaxtyping import Array, Float, Int

from jaxreg.spatial.grid import identity_grid

_MODES = {"zeros": "constant", "border": "nearest"}


def _check_disp(disp, name="disp"):
    if disp.ndim not in (3, 4) or disp.shape[-1] != disp.ndim - 1:
        raise ValueError(f"{name} must be (*spatial, D) with D = 2 or 3 = len(spatial), got {disp.shape}")


def _split_channels(image, d, fn_name):
    if image.ndim == d:
        return image[..., None], True
    if image.ndim == d + 1:
        return image, False
    raise ValueError(f"{fn_name}: image must be (*spatial) or (*spatial, C) with {d} spatial axes, got {image.shape}")


def _cell(shape, coords):
    """``(base, frac, strides)``: the interpolation cell's low corner (int32), the fractions in it, and the
    grid's row-major strides (NumPy int32), shared by the corner forms below."""
    base_f = jnp.floor(coords)
    strides = np.cumprod((tuple(shape[1:]) + (1,))[::-1])[::-1].astype(np.int32)
    return base_f.astype(jnp.int32), coords - base_f, strides


def _corners(shape, coords, padding):
    """Linear indices and weights of the 2^D interpolation corners."""
    d = len(shape)
    base, frac, strides = _cell(shape, coords)
    hi = np.asarray(shape, np.int32) - 1
    out = []
    for o in itertools.product((0, 1), repeat=d):
        idx = base + jnp.asarray(o, jnp.int32)
        w = jnp.prod(jnp.where(jnp.asarray(o, bool), frac, 1.0 - frac), axis=-1)
        valid = None
        if padding == "zeros":
            valid = jnp.all((idx >= 0) & (idx <= hi), axis=-1)
            w = jnp.where(valid, w, 0.0)
        lin = jnp.sum(jnp.clip(idx, 0, hi) * strides, axis=-1)
        out.append((o, lin, w, valid))
    return frac, out


def _corner_factors(shape, coords, padding):
    """The 2^D corners as sums and products of per-axis parts: ``[(lin, w), ...]``.

    One clip, one stride product and one weight per axis and side (floor or floor + 1), instead of per
    corner; equal to :func:`_corners`. For one channel XLA fuses all of it into the gathers' loop: a
    dense 192x192x128 sample of a 256x256x150 scan ran in 50-58 instead of 114-198 ms, and compiled in 0.11
    instead of 0.17-0.21 s (2 CPU cores; issue 18, docs/experiments/issue18_cold.md).
    """
    base, frac, strides = _cell(shape, coords)
    parts = []
    for a, n in enumerate(shape):
        idx = (base[..., a], base[..., a] + 1)
        w = (1.0 - frac[..., a], frac[..., a])
        if padding == "zeros":
            w = tuple(jnp.where((i >= 0) & (i <= n - 1), x, 0.0) for i, x in zip(idx, w))
        parts.append(tuple(zip((jnp.clip(i, 0, n - 1) * strides[a] for i in idx), w)))
    return [(functools.reduce(jnp.add, [parts[a][s][0] for a, s in enumerate(o)]),
             functools.reduce(jnp.multiply, [parts[a][s][1] for a, s in enumerate(o)]))
            for o in itertools.product((0, 1), repeat=len(shape))]


TABLE_POINTS = 2 ** 17  # most points sampled through a corner table (:func:`_corner_table`)


def _corner_table(shape, coords, padding):
    """The 2^D corners as ``(..., 2^D)`` tables ``(lin, w)``, computed for all corners at once (broadcast
    over a corner axis; equal to :func:`_corners`). With several channels and at most ``TABLE_POINTS`` points,
    the form XLA runs fastest (2 CPU cores, issue 18): scaling and squaring of a 40x40x30 field (5 steps) 1.8
    instead of 2.8 ms, compiled in 0.14 instead of 0.19 s. Beyond, the tables are memory that the per-corner
    form does not need (96 MB for a 128x128x96 field, and no faster: 93 ms both at 96x112x96)."""
    d = len(shape)
    offs = np.array(list(itertools.product((0, 1), repeat=d)), np.int32)  # (2^D, D), _corners' order
    base, frac, strides = _cell(shape, coords)
    idx = base[..., None, :] + offs
    hi = np.asarray(shape, np.int32) - 1
    w = jnp.prod(jnp.where(offs.astype(bool), frac[..., None, :], 1.0 - frac[..., None, :]), axis=-1)
    if padding == "zeros":
        w = jnp.where(jnp.all((idx >= 0) & (idx <= hi), axis=-1), w, 0.0)
    return jnp.sum(jnp.clip(idx, 0, hi) * strides, axis=-1), w


def _sample_value(image, coords, padding):
    """Linear samples ``(..., C)``: :func:`_corner_factors` for one channel, :func:`_corner_table` for several
    (:func:`_corners` beyond ``TABLE_POINTS`` points).

    The value without a coordinate gradient (:func:`_linear_sample`); with one, the forward pass keeps the
    per-corner form of :func:`_corners`, whose gathers XLA shares with the backward pass (either form there
    ran 1.5-4x slower at 32768 points).
    """
    flat = image.reshape(-1, image.shape[-1])
    if flat.shape[-1] == 1:
        return sum(w[..., None] * flat[lin] for lin, w in _corner_factors(image.shape[:-1], coords, padding))
    if _points(coords) > TABLE_POINTS:
        return _per_corner_value(image, coords, padding)
    lin, w = _corner_table(image.shape[:-1], coords, padding)
    return sum(w[..., k, None] * flat[lin[..., k]] for k in range(lin.shape[-1]))


def _per_corner_value(image, coords, padding):
    """Linear samples ``(..., C)`` in the per-corner form of :func:`_corners`."""
    flat = image.reshape(-1, image.shape[-1])
    return sum(w[..., None] * flat[lin] for _, lin, w, _ in _corners(image.shape[:-1], coords, padding)[1])


def _points(coords) -> int:
    """Number of points in ``(..., D)`` coordinates."""
    return math.prod(coords.shape[:-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linear_sample(image, coords, padding):
    return _sample_value(image, coords, padding)


def _linear_sample_fwd(image, coords, padding):
    # symbolic_zeros: skip the image cotangent (a scatter) when the image is a
    # constant of the differentiated function, e.g. precomputed features, and
    # the coordinates' cotangent (gathers) when they are constants, e.g. the
    # fixed sample points of a differentiated control-grid field.
    need_image, need_coords = image.perturbed, coords.perturbed
    image, coords = image.value, coords.value
    if need_coords:  # the backward pass's per-corner form: XLA shares the gathers (_sample_value)
        value = _per_corner_value(image, coords, padding)
    else:
        value = _sample_value(image, coords, padding)
    return value, (image, coords, need_image, need_coords)


def _linear_sample_bwd(padding, res, g):
    # Hand-written adjoint: in-bounds scatter-adds for the image (indices are
    # clipped, so promise_in_bounds holds) and gathers for the coordinates.
    # About 3x faster than autodiff of map_coordinates on CPU.
    image, coords, need_image, need_coords = res
    shape, c = image.shape[:-1], image.shape[-1]
    d = len(shape)
    flat = image.reshape(-1, c)
    if not need_coords and _points(coords) <= TABLE_POINTS:
        # the image alone (a control-grid field at fixed points): one scatter of all corners from the
        # corner table, 1.4 instead of 2.4 ms at 32768 points (2 CPU cores, issue 18)
        lin, w = _corner_table(shape, coords, padding)
        upd = (w[..., None] * g[..., None, :]).reshape(-1, c)
        return jnp.zeros_like(flat).at[lin.reshape(-1)].add(upd, mode="promise_in_bounds").reshape(image.shape), None
    # per corner, sharing the forward pass's gathers (for the image too: one table scatter beside the
    # per-corner coordinate gradient ran 1.2-1.4x slower in scaling and squaring under grad)
    gflat = g.reshape(-1, c)
    frac, cs = _corners(shape, coords, padding)
    g_image = jnp.zeros_like(flat)
    g_coords = [0.0] * d
    for o, lin, w, valid in cs:
        if need_image:
            g_image = g_image.at[lin.reshape(-1)].add(w.reshape(-1, 1) * gflat, mode="promise_in_bounds")
        if not need_coords:
            continue
        s = jnp.sum(flat[lin] * g, axis=-1)
        if valid is not None:
            s = jnp.where(valid, s, 0.0)
        for k in range(d):
            dw = functools.reduce(
                jnp.multiply, [jnp.where(o[j], frac[..., j], 1.0 - frac[..., j]) for j in range(d) if j != k])
            g_coords[k] = g_coords[k] + (s * dw if o[k] else -s * dw)
    g_image = g_image.reshape(image.shape) if need_image else None
    return g_image, jnp.stack(g_coords, axis=-1).astype(coords.dtype) if need_coords else None


_linear_sample.defvjp(_linear_sample_fwd, _linear_sample_bwd, symbolic_zeros=True)


def sample(
    image: Float[Array, "*in_spatial C"],
    coords: Float[Array, "*out_spatial D"],
    *,
    order: int = 1,
    padding: str = "zeros",
) -> Float[Array, "*out_spatial C"]:
    """Sample an image at arbitrary voxel coordinates.

    Linear sampling equals ``jax.scipy.ndimage.map_coordinates(order=1)``
    (``mode="constant"`` for zeros, ``"nearest"`` for border padding) but has
    a hand-written VJP: the image cotangent is a per-corner in-bounds
    scatter-add, which XLA runs ~3x faster than the autodiff of
    ``map_coordinates`` (the bottleneck of scaling and squaring under
    ``grad``; benchmarks/spatial_speed.py). Nearest neighbour uses
    ``map_coordinates(order=0)`` on rounded coordinates (half rounds up).

    Args:
      image: ``(*in_spatial, C)`` (or ``(*in_spatial)``) array.
      coords: ``(*out_spatial, D)`` voxel coordinates into ``image`` (any
        leading shape, e.g. ``(N, D)`` for a list of points).
      order: 1 for (bi/tri)linear, 0 for nearest neighbour.
      padding: ``"zeros"`` (outside is 0) or ``"border"`` (edge values repeat).

    Returns:
      ``(*out_spatial, C)`` (or ``(*out_spatial)``) samples, dtype of ``image``.

    Raises:
      ValueError: on inconsistent ranks or an unknown ``order``/``padding``.
    """
    d = coords.shape[-1]
    if d not in (2, 3) or coords.ndim < 2:
        raise ValueError(f"coords must be (*out_shape, D) with D = 2 or 3, got {coords.shape}")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 or 1, got {order}")
    if padding not in _MODES:
        raise ValueError(f"padding must be one of {sorted(_MODES)}, got {padding!r}")
    # numpy inputs closed over by jit/grad would otherwise reach the backward
    # pass as numpy arrays and be indexed with tracers.
    image, squeeze = _split_channels(jnp.asarray(image), d, "sample")
    if order == 1:
        out = _linear_sample(image.astype(coords.dtype) if not jnp.issubdtype(image.dtype, jnp.floating)
                             else image, coords, padding)
    else:
        cs = [jnp.floor(coords[..., i] + 0.5) for i in range(d)]
        fn = functools.partial(map_coordinates, coordinates=cs, order=0, mode=_MODES[padding], cval=0)
        out = jax.vmap(fn, in_axes=-1, out_axes=-1)(image)
    return out[..., 0] if squeeze else out


def warp(
    image: Float[Array, "*in_spatial C"],
    disp: Float[Array, "*spatial D"],
    *,
    order: int = 1,
    padding: str = "zeros",
) -> Float[Array, "*spatial C"]:
    """Warp (pull back) an image by a displacement field.

    ``warped(x) = image(x + disp(x))``. The image may live on a different grid
    from ``disp`` (then ``disp`` must already map into the image's voxels).

    Args:
      image: ``(*in_spatial, C)`` or ``(*in_spatial)`` moving image.
      disp: ``(*spatial, D)`` displacement in voxel units (float32).
      order: 1 linear, 0 nearest neighbour.
      padding: ``"zeros"`` or ``"border"``.

    Returns:
      ``(*spatial, C)`` (or ``(*spatial)``) warped image on the grid of ``disp``.

    Raises:
      ValueError: on bad ranks (with the offending shapes).

    References:
      Balakrishnan et al., "VoxelMorph", IEEE TMI 2019, Sec. III-C (spatial
      transformer with linear interpolation).
    """
    _check_disp(disp)
    return sample(image, identity_grid(disp.shape[:-1], disp.dtype) + disp, order=order, padding=padding)


def warp_labels(
    labels: Int[Array, "*in_spatial"],
    disp: Float[Array, "*spatial D"],
    *,
    method: str = "nearest",
    label_values: Sequence[int] | None = None,
) -> Int[Array, "*spatial"]:
    """Warp an integer label map.

    Args:
      labels: ``(*in_spatial)`` integer labels.
      disp: ``(*spatial, D)`` displacement (voxels).
      method: ``"nearest"`` (nearest-neighbour lookup) or ``"linear"``
        (each label's indicator is warped linearly and the arg-max label wins;
        smoother boundaries, memory O(voxels) via a scan over labels).
      label_values: static tuple of the label values for ``"linear"``;
        default: ``np.unique(labels)`` computed on the host (not jittable then).

    Returns:
      ``(*spatial)`` labels, same dtype as ``labels``; outside the image is 0
      for ``"linear"`` unless 0 is not a label, and the border label for
      ``"nearest"`` (clamped lookup).

    Raises:
      ValueError: if ``labels`` is not integer or ranks disagree.
    """
    _check_disp(disp)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be an integer array, got dtype {labels.dtype}")
    d = disp.shape[-1]
    if labels.ndim != d:
        raise ValueError(f"labels must be (*spatial) with {d} axes, got {labels.shape}")
    if method == "nearest":
        return warp(labels, disp, order=0, padding="border").astype(labels.dtype)
    if method != "linear":
        raise ValueError(f"method must be 'nearest' or 'linear', got {method!r}")
    if label_values is None:
        label_values = tuple(int(v) for v in np.unique(np.asarray(labels)))
    values = jnp.asarray(label_values, labels.dtype)
    coords = identity_grid(disp.shape[:-1], disp.dtype) + disp

    def step(carry, value):
        best_p, best_v = carry
        p = sample((labels == value).astype(disp.dtype), coords, order=1, padding="zeros")
        better = p > best_p
        return (jnp.where(better, p, best_p), jnp.where(better, value, best_v)), None

    init = (jnp.zeros(disp.shape[:-1], disp.dtype), jnp.zeros(disp.shape[:-1], labels.dtype))
    (_, best_v), _ = jax.lax.scan(step, init, values)
    return best_v
