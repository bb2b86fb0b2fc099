"""Input checks shared by the metrics (label maps, label lists, spacings, masks)."""
from collections.abc import Sequence

import jax
import numpy as np


def _is_label_dtype(dtype) -> bool:
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.bool_)


def _check_label_maps(pred, target, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Host copies of two integer label maps of equal 2D/3D shape."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"{name}: pred and target shapes differ: {pred.shape} vs {target.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"{name}: expected 2D or 3D label maps (*spatial), got shape {pred.shape}")
    for arg, arr in (("pred", pred), ("target", target)):
        if not _is_label_dtype(arr.dtype):
            raise ValueError(f"{name}: {arg} must be an integer label map, got dtype {arr.dtype} "
                             f"(shape {arr.shape}); round and cast segmentations first")
    return pred, target


def _check_label_list(labels, name: str) -> tuple[int, ...]:
    """Validate a user list of label values: a flat sequence of integers, no duplicates."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name}: labels must be a flat sequence of integers, got shape {arr.shape}")
    if arr.size and (np.issubdtype(arr.dtype, np.bool_) or not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name}: labels must be integers, got {labels!r} (dtype {arr.dtype})")
    out = tuple(int(v) for v in arr.tolist())
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: labels contain duplicates: {out!r}")
    return out


def _resolve_labels(pred: np.ndarray, target: np.ndarray, labels, name: str) -> np.ndarray:
    """The requested labels, or the sorted union of nonzero values in either map."""
    if labels is None:
        present = np.union1d(np.unique(pred), np.unique(target)).astype(np.int64)
        return present[present != 0]
    return np.asarray(_check_label_list(labels, name), dtype=np.int64)


def _check_spacing(spacing, ndim: int, name: str):
    """Voxel size per axis (mm): ``ndim`` positive finite values.

    Concrete inputs come back as a float64 numpy array; a traced array (spacing
    passed as a jit argument) is only shape-checked.
    """
    try:
        sp = np.asarray(spacing, dtype=np.float64)
    except jax.errors.TracerArrayConversionError:
        if tuple(spacing.shape) != (ndim,):
            raise ValueError(f"{name}: spacing must have shape ({ndim},), got {tuple(spacing.shape)}") from None
        return spacing
    if sp.shape != (ndim,):
        raise ValueError(f"{name}: spacing must hold one voxel size per axis, shape ({ndim},), got {sp.shape}")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"{name}: spacing must be positive and finite (mm), got {sp.tolist()}")
    return sp


def _check_mask(mask, spatial: Sequence[int], name: str):
    """A mask must have the spatial shape; nonzero/True marks voxels to keep."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(spatial):
        raise ValueError(f"{name}: mask shape {tuple(mask.shape)} does not match spatial shape {tuple(spatial)}")
    return mask


def _check_disp(disp, name: str, arg: str = "disp") -> tuple[int, ...]:
    """A displacement must be ``(*spatial, D)`` with D = len(spatial) in {2, 3}; returns spatial."""
    shape = tuple(disp.shape)
    if len(shape) not in (3, 4) or shape[-1] != len(shape) - 1:
        raise ValueError(f"{name}: {arg} must be (*spatial, D) with D = len(spatial) = 2 or 3, got shape {shape}")
    if not np.issubdtype(disp.dtype, np.floating):
        raise ValueError(f"{name}: {arg} must be floating point, got dtype {disp.dtype} (shape {shape})")
    return shape[:-1]
