"""Single-image training data for feature extractors: co-registered contrasts of random slices (or volumes).

:class:`SliceSource` serves the pretraining of ContraReg's autoencoders and
DeepSim's feature networks (``jaxreg.methods.features``): example ``i`` is a
function of ``(seed, i)`` only (grain ``MapDataset.source``), a random slice
through the central half of a random subject's foreground along
``slice_axis`` (the whole volume when ``slice_axis`` is None), mirrored along
random axes (ContraReg Sec. 3: random flips).
"""
from __future__ import annotations

import numpy as np

from jaxreg.data.pipeline import SubjectData


class SliceSource:
    """Random-access ``{"images": (*spatial, K) float32[, "labels": (*spatial) int32]}`` examples.

    Args:
      subjects: subjects on one grid (:func:`jaxreg.data.car.load_brain_subjects`),
        each holding every contrast of ``contrasts``.
      contrasts: the channels of ``images``, in order.
      slice_axis: axis of the 2D slices, or None for whole volumes.
      flip: mirror images and labels along random spatial axes.
      with_labels: include ``labels`` (every subject must have them).
      seed: base seed; length: nominal number of examples.

    Raises:
      ValueError: no subjects, a subject without a contrast, or labels asked for and missing.
    """

    def __init__(self, subjects: list[SubjectData], *, contrasts, slice_axis: int | None = 2, flip: bool = True,
                 with_labels: bool = False, seed: int = 0, length: int = 2 ** 31 - 1):
        if not subjects:
            raise ValueError("SliceSource needs at least one subject")
        self.contrasts = tuple(contrasts)
        for s in subjects:
            missing = [c for c in self.contrasts if c not in s.images]
            if missing:
                raise ValueError(f"subject {s.name} lacks contrasts {missing} (has {sorted(s.images)})")
            if with_labels and s.labels is None:
                raise ValueError(f"subject {s.name} has no labels")
        self.subjects, self.slice_axis, self.flip = subjects, slice_axis, bool(flip)
        self.with_labels, self.seed, self.length = bool(with_labels), int(seed), int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, int(index)])
        s = self.subjects[int(rng.integers(len(self.subjects)))]
        images = np.concatenate([s.images[c] for c in self.contrasts], axis=-1)
        labels = s.labels if self.with_labels else None
        if self.slice_axis is not None:
            ax = self.slice_axis
            fg = np.nonzero(np.any(images[..., 0] > 0.05, axis=tuple(a for a in range(3) if a != ax)))[0]
            lo, hi = (fg.min(), fg.max()) if fg.size else (0, images.shape[ax] - 1)
            q = (hi - lo) // 4
            k = int(rng.integers(lo + q, max(lo + q + 1, hi - q + 1)))
            images = np.take(images, k, axis=ax)
            labels = None if labels is None else np.take(labels, k, axis=ax)
        if self.flip:
            axes = tuple(a for a in range(images.ndim - 1) if rng.random() < 0.5)
            if axes:
                images = np.flip(images, axes)
                labels = None if labels is None else np.flip(labels, axes)
        out = {"images": np.ascontiguousarray(images, np.float32)}
        if labels is not None:
            out["labels"] = np.ascontiguousarray(labels, np.int32)
        return out


def central_slice_examples(subjects: list[SubjectData], *, contrasts, num_slices: int, slice_axis: int | None = 2,
                           with_labels: bool = False) -> list[dict]:
    """Validation examples: ``num_slices`` central slices per subject (or whole volumes), unflipped."""
    from jaxreg.data.car import central_slices

    out = []
    for s in subjects:
        images = np.concatenate([s.images[c] for c in contrasts], axis=-1)
        ks = central_slices(images[..., :1], num_slices, axis=slice_axis) if slice_axis is not None else [None]
        for k in ks:
            take = (lambda a: np.take(a, k, axis=slice_axis)) if k is not None else (lambda a: a)  # noqa: E731
            ex = {"images": np.ascontiguousarray(take(images), np.float32), "name": f"{s.name} {k}"}
            if with_labels:
                ex["labels"] = np.ascontiguousarray(take(s.labels), np.int32)
            out.append(ex)
    return out
