"""Dice overlap per label, its NaN-aware mean, and Dice30 (mean of the worst 30 %).

Convention shared by every function here: a label absent from *both* maps has
an undefined Dice (0/0) and is reported as NaN; reducers ignore NaNs. A label
present in only one map scores 0.
"""
import functools
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxreg.metrics._validate import _check_label_list, _check_label_maps, _is_label_dtype, _resolve_labels


def dice(pred: Int[Array, "*spatial"], target: Int[Array, "*spatial"], *,
         labels: Sequence[int] | None = None) -> Float[np.ndarray, " L"]:
    """Dice similarity coefficient of each label, on the host (numpy).

    ``Dice_l = 2 |P_l & T_l| / (|P_l| + |T_l|)`` with ``P_l = {pred == l}`` and
    ``T_l = {target == l}``.

    Args:
      pred: ``(*spatial)`` integer (or bool) label map, D = 2 or 3; numpy or
        JAX array (copied to the host).
      target: ``(*spatial)`` integer label map of the same shape.
      labels: label values to score, in the order wanted. Default: the sorted
        union of the nonzero values present in either map (0 = background is
        only scored when listed explicitly).

    Returns:
      ``(L,)`` float64 numpy array in [0, 1], one entry per label; NaN for a
      label absent from both maps (average with :func:`dice_mean`).

    Raises:
      ValueError: if the shapes differ, are not 2D/3D, a map is not integer
        typed, or ``labels`` holds non-integers or duplicates.

    References:
      Dice, "Measures of the amount of ecologic association between species",
      Ecology 26(3), 1945. doi:10.2307/1932409

    Example:
      >>> import numpy as np
      >>> a = np.array([[1, 1], [2, 0]]); b = np.array([[1, 0], [2, 2]])
      >>> dice(a, b).round(4).tolist()
      [0.6667, 0.6667]
    """
    pred, target = _check_label_maps(pred, target, "dice")
    lab = _resolve_labels(pred, target, labels, "dice")
    count_p = _counts(pred.ravel(), lab)
    count_t = _counts(target.ravel(), lab)
    same = pred == target
    inter = _counts(pred[same], lab)
    denom = count_p + count_t
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2.0 * inter / denom, np.nan)


def _counts(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Number of occurrences of each of ``labels`` in ``values`` (float64)."""
    uniq, cnt = np.unique(values, return_counts=True)
    if uniq.size == 0:
        return np.zeros(labels.shape, np.float64)
    pos = np.clip(np.searchsorted(uniq, labels), 0, uniq.size - 1)
    return np.where(uniq[pos] == labels, cnt[pos], 0).astype(np.float64)


def dice_jax(pred: Int[Array, "*spatial"], target: Int[Array, "*spatial"], *,
             labels: Sequence[int]) -> Float[Array, " L"]:
    """Dice of each of a fixed set of labels, jittable (labels are static).

    Same definition and NaN convention as :func:`dice`, for use inside jitted
    validation steps. Memory is O(voxels), not O(voxels x labels): voxels are
    binned by label with a sorted search and a segment sum.

    Args:
      pred: ``(*spatial)`` integer (or bool) label map, D = 2 or 3.
      target: ``(*spatial)`` integer label map of the same shape.
      labels: keyword-only, static tuple of distinct integer label values
        (a new tuple triggers one retrace).

    Returns:
      ``(L,)`` float32 array in [0, 1] in the order of ``labels``; NaN where a
      label is absent from both maps.

    Raises:
      ValueError: at trace time, if the shapes differ, are not 2D/3D, a map is
        not integer typed, or ``labels`` is not a tuple of distinct integers.

    References:
      Dice, Ecology 26(3), 1945. doi:10.2307/1932409
    """
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"dice_jax: pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if len(pred.shape) not in (2, 3):
        raise ValueError(f"dice_jax: expected 2D or 3D label maps (*spatial), got shape {tuple(pred.shape)}")
    for arg, arr in (("pred", pred), ("target", target)):
        if not _is_label_dtype(arr.dtype):
            raise ValueError(f"dice_jax: {arg} must be an integer label map, got dtype {arr.dtype} "
                             f"(shape {tuple(arr.shape)})")
    return _dice_jax(jnp.asarray(pred), jnp.asarray(target), labels=_check_label_list(labels, "dice_jax"))


@functools.partial(jax.jit, static_argnames=("labels",))
def _dice_jax(pred, target, *, labels: tuple[int, ...]):
    num = len(labels)
    if num == 0:
        return jnp.zeros((0,), jnp.float32)
    order = np.argsort(labels)
    sorted_labels = np.asarray(labels, np.int64)[order]
    dtype = jnp.promote_types(jnp.promote_types(pred.dtype, target.dtype), jnp.int32)
    dtype = jax.dtypes.canonicalize_dtype(dtype)
    # Label values outside the maps' dtype range cannot occur in them.
    info = jnp.iinfo(dtype)
    keep = (sorted_labels >= info.min) & (sorted_labels <= info.max)
    table = jnp.asarray(np.where(keep, sorted_labels, 0), dtype)
    keep = jnp.asarray(keep)

    def bin_index(x):
        x = x.astype(dtype).ravel()
        pos = jnp.clip(jnp.searchsorted(table, x), 0, num - 1)
        hit = (table[pos] == x) & keep[pos]
        return jnp.where(hit, pos, num)  # bin `num` collects other values

    ip, it = bin_index(pred), bin_index(target)
    ones = jnp.ones(ip.shape, jnp.float32)
    count_p = jax.ops.segment_sum(ones, ip, num + 1)[:num]
    count_t = jax.ops.segment_sum(ones, it, num + 1)[:num]
    inter = jax.ops.segment_sum(ones, jnp.where(ip == it, ip, num), num + 1)[:num]
    denom = count_p + count_t
    d = jnp.where(denom > 0, 2.0 * inter / jnp.where(denom > 0, denom, 1.0), jnp.nan)
    return d[jnp.asarray(np.argsort(order))]  # back to the caller's order


def dice_mean(per_label_dice: Float[Array, " L"]) -> Float[Array, ""]:
    """Mean Dice over labels, ignoring NaN (labels absent from both maps).

    Args:
      per_label_dice: ``(L,)`` scores from :func:`dice` or :func:`dice_jax`;
        numpy (host result) or JAX (jittable) array.

    Returns:
      Scalar in [0, 1] of the same array kind; NaN if every entry is NaN.

    Raises:
      ValueError: if the input is not 1-D.
    """
    xp = jnp if isinstance(per_label_dice, jax.Array) else np
    x = xp.asarray(per_label_dice)
    if x.ndim != 1:
        raise ValueError(f"dice_mean: expected a (L,) vector of per-label Dice, got shape {x.shape}")
    if xp is np:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN -> NaN, by convention
            return np.nanmean(x)
    return jnp.nanmean(x)


def dice30(per_label_dice: Float[Array, " L"]) -> Float[Array, ""]:
    """Dice30: mean of the lowest 30 % of the per-label Dice scores.

    With ``n`` the number of non-NaN scores, the ``k = ceil(0.3 n)`` smallest
    are averaged (computed in integers as ``(3 n + 9) // 10``, so n = 10 gives
    k = 3 exactly, and any n >= 1 gives k >= 1). NaN entries (labels absent
    from both maps) are dropped first. A robustness summary: it tracks the
    worst-aligned structures that the mean hides.

    Args:
      per_label_dice: ``(L,)`` scores from :func:`dice` or :func:`dice_jax`;
        numpy (host) or JAX (jittable: ``k`` is computed from traced counts).

    Returns:
      Scalar in [0, 1] of the same array kind; NaN if every entry is NaN.

    Raises:
      ValueError: if the input is not 1-D.

    References:
      Dey et al., "ContraReg: Contrastive Learning of Multi-modality
      Unsupervised Deformable Image Registration", MICCAI 2022 (Dice30);
      Mok et al., "Modality-Agnostic Structural Image Representation Learning
      for Deformable Multi-Modality Medical Image Registration", CVPR 2024
      (DSC30).
    """
    xp = jnp if isinstance(per_label_dice, jax.Array) else np
    x = xp.asarray(per_label_dice)
    if x.ndim != 1:
        raise ValueError(f"dice30: expected a (L,) vector of per-label Dice, got shape {x.shape}")
    x = x.astype(xp.float32 if xp is jnp else np.float64)
    n = xp.sum(~xp.isnan(x))
    k = (3 * n + 9) // 10
    s = xp.sort(x)  # NaN sorts last in numpy and JAX
    take = xp.arange(x.shape[0]) < k
    total = xp.sum(xp.where(take, s, 0.0))
    out = xp.where(k > 0, total / xp.maximum(k, 1), xp.nan)
    return out if xp is jnp else out[()]
