"""KeyMorph training data: scans on the network's input cube, inter-subject labelled pairs and
same-subject multi-contrast pairs, plus header rotations for the rotation experiments.

Every scan is resampled onto its own input cube (:func:`jaxreg.methods.keymorph.canonical_grid`:
world axes, centred on its intensity centroid) and normalised to [0, 1] (0.5-99.5 percentiles).
The contrasts of a multi-contrast subject share the first contrast's cube, so they stay in voxel
correspondence (KeyMorph eq. 11 needs it). Label maps are resampled by nearest neighbour and remapped
to ``0..K-1`` with one table for all subjects. Example ``i`` of :class:`KeyMorphSource` depends only
on ``(seed, i)``; the random affine augmentation happens inside the jitted loss.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxreg.data.pipeline import normalize
from jaxreg.io import Volume, load_labels, resample_to_grid


@dataclasses.dataclass
class CubeSubject:
    """One subject on its input cube: ``images`` contrast -> ``(*grid)`` float32 in [0, 1]; ``labels``
    ``(*grid)`` int32 (remapped) or None; ``affine`` the cube's voxel -> world matrix; ``label_values``
    the nonzero values of the full-resolution label map (small labels may vanish on the coarse cube);
    ``source`` the first contrast as loaded (for the validation rotations)."""

    name: str
    images: dict
    affine: np.ndarray
    labels: np.ndarray | None = None
    label_values: np.ndarray | None = None
    source: Volume | None = None


def to_cube(vol: Volume, cube_affine, grid, *, labels: bool = False, smooth: bool = True) -> np.ndarray:
    """``vol`` resampled onto the cube ``(grid, cube_affine)``: linear with Gaussian anti-aliasing (unless
    ``smooth=False``: ``vol`` is already :func:`jaxreg.pipeline.antialias`-ed), then normalised to [0, 1];
    nearest neighbour for ``labels``."""
    from jaxreg.pipeline import resample_smooth

    if labels:
        return resample_to_grid(np.asarray(vol.data), vol.affine, tuple(grid), cube_affine, order=0).astype(np.int32)
    return normalize(np.asarray(resample_smooth(vol, tuple(grid), cube_affine, smooth=smooth))[..., 0]).astype(np.float32)


def load_cube_subject(name: str, paths: dict, *, grid, spacing: float, labels_path=None) -> CubeSubject:
    """Load a subject's contrasts (``contrast -> path``) onto the first contrast's input cube.

    Raises:
      ValueError: no images, or an image that is not 3D.
    """
    from jaxreg.data.views import load_subject_volumes
    from jaxreg.methods.keymorph import canonical_grid

    vols = load_subject_volumes(name, paths, ndim=len(grid))
    first = next(iter(vols.values()))
    cube = canonical_grid(first.data, first.affine, grid=grid, spacing=spacing)
    images = {c: to_cube(v, cube, grid) for c, v in vols.items()}
    lab = values = None
    if labels_path is not None:
        full = load_labels(labels_path)
        lab, values = to_cube(full, cube, grid, labels=True), np.unique(np.asarray(full.data))
    return CubeSubject(name, images, cube, lab, values, first)


def label_table(label_maps) -> np.ndarray:
    """Sorted nonzero label values over all maps (value ``table[k - 1]`` becomes ``k``)."""
    return np.unique(np.concatenate([np.unique(m) for m in label_maps]))[1:] if label_maps else np.zeros(0)


def remap_labels(labels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Original label values -> ``1..len(table)`` (0 and values not in the table -> 0), int32."""
    lut = np.zeros(int(max(labels.max(), table.max() if len(table) else 0)) + 1, np.int32)
    lut[table.astype(np.int64)] = np.arange(1, len(table) + 1, dtype=np.int32)
    return lut[np.clip(labels, 0, len(lut) - 1)]


def rotation_about_axis(axis, degrees: float) -> np.ndarray:
    """``(3, 3)`` rotation by ``degrees`` about the unit vector ``axis`` (Rodrigues)."""
    a = np.asarray(axis, np.float64)
    a = a / np.linalg.norm(a)
    t = np.deg2rad(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def rotate_header(affine, rotation, center_world) -> np.ndarray:
    """The NIfTI affine of a scan whose content is rotated by ``rotation`` (3x3) about ``center_world`` (mm).

    The voxels are untouched, so image and labels rotate together exactly (no resampling):
    ``world' = R (world - c) + c``.
    """
    r = np.eye(4)
    r[:3, :3] = rotation
    c = np.asarray(center_world, np.float64)
    r[:3, 3] = c - rotation @ c
    return r @ np.asarray(affine, np.float64)


class KeyMorphSource:
    """Random-access source of KeyMorph training examples (grain ``MapDataset.source``).

    Example keys (the names follow the training stack's batch layout): ``fixed``, ``moving``
    ``(*grid, 1)`` float32; ``fixed_labels``, ``moving_labels`` ``(*grid)`` int32 (zeros when
    unlabelled); ``task`` float32 (0 = inter-subject labelled pair, 1 = same subject in two contrasts,
    2 = pretraining only); ``pretrain`` float32 (1 for the first ``pretrain_examples`` examples: eq. 12).

    Args:
      labelled: subjects with labels (single contrast is enough) for the pairs.
      multi: subjects with at least two contrasts for eq. (11).
      pretrain_examples: number of leading pretraining examples (steps x batch size).
      consistency_prob: probability of a multi-contrast example after pretraining.
      pretrain_multi: pretrain on the multi-contrast subjects too (default: the labelled ones only;
        with all 13 subjects of configs/keymorph_brain.py the pretraining loss stayed at the
        keypoints-at-the-centre value for 740 steps, with the 5 IXI T1s it halved in 200).
      pretrain_always: keep eq. (12) on every example after the pretraining (ours: without it the
        keypoints contracted to an 11 mm spread in the soft-Dice phase).
      seed: base seed.
    """

    def __init__(self, labelled: list[CubeSubject], multi: list[CubeSubject], *, pretrain_examples: int = 0,
                 consistency_prob: float = 0.5, pretrain_multi: bool = False, pretrain_always: bool = False,
                 seed: int = 0,
                 length: int = 10 ** 8):
        if len(labelled) < 2:
            raise ValueError(f"KeyMorphSource needs at least 2 labelled subjects, got {len(labelled)}")
        if any(len(s.images) < 2 for s in multi):
            raise ValueError("every multi-contrast subject needs at least two contrasts")
        self.labelled, self.multi = labelled, multi
        self.pretrain_examples, self.consistency_prob = int(pretrain_examples), float(consistency_prob)
        self.seed, self.length, self.pretrain_multi = seed, length, pretrain_multi
        self.pretrain_always = pretrain_always
        self.grid = next(iter(labelled[0].images.values())).shape
        self._zeros = np.zeros(self.grid, np.int32)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, int(index)])
        ex = {"fixed_labels": self._zeros, "moving_labels": self._zeros,
              "pretrain": np.float32(self.pretrain_always or index < self.pretrain_examples)}
        if index < self.pretrain_examples:
            pool = self.labelled + (self.multi if self.pretrain_multi else [])
            s = pool[int(rng.integers(len(pool)))]
            names = list(s.images)
            a, b = rng.choice(names, 2, replace=False) if len(names) > 1 else (names[0], names[0])
            ex.update(fixed=s.images[a], moving=s.images[b], task=np.float32(2 if a == b else 1))
        elif self.multi and rng.random() < self.consistency_prob:
            s = self.multi[int(rng.integers(len(self.multi)))]
            a, b = rng.choice(list(s.images), 2, replace=False)
            ex.update(fixed=s.images[a], moving=s.images[b], task=np.float32(1))
        else:
            i, j = rng.choice(len(self.labelled), 2, replace=False)
            f, m = self.labelled[int(i)], self.labelled[int(j)]
            ex.update(fixed=next(iter(f.images.values())), moving=next(iter(m.images.values())),
                      fixed_labels=f.labels, moving_labels=m.labels, task=np.float32(0))
        ex["fixed"] = ex["fixed"][..., None].astype(np.float32)
        ex["moving"] = ex["moving"][..., None].astype(np.float32)
        return ex
