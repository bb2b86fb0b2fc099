"""Co-registered views for representation learning (DNS): two contrasts of one subject, or one image twice.

Each subject's contrasts are resampled onto one working grid at
``resolution`` mm (its first contrast's field of view; other contrasts enter
through their NIfTI affines, so e.g. IXI002's T2 on its own grid lines up with
its T1) and normalised to [0, 1] (0.5-99.5 percentiles). Example ``i`` of
:class:`ViewSource` depends only on ``(seed, i)``: a random subject, two of
its contrasts (or one contrast twice when it has one, or with probability
``same_prob``; the training loss then augments the second view), a random
crop around a foreground voxel and random flips applied to both views. The
views stay in voxel correspondence, which is all contrastive learning of
dense descriptors needs (DNS Sec. 3.3: positives at identical locations).
"""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from jaxreg.data.pipeline import normalize
from jaxreg.io import load_image


@dataclasses.dataclass
class ViewSubject:
    """One subject on its own working grid: ``images`` contrast -> ``(*spatial,)`` float32 in [0, 1]."""

    name: str
    images: dict


def load_subject_volumes(name: str, paths: dict, *, ndim: int = 3) -> dict:
    """``contrast -> Volume`` of a subject's images (``contrast -> NIfTI path``).

    Raises:
      ValueError: no contrasts, or an image that is not ``ndim``-D.
    """
    if not paths:
        raise ValueError(f"subject {name} has no images")
    vols = {c: load_image(p) for c, p in paths.items()}
    for c, v in vols.items():
        if v.data.ndim != ndim:
            raise ValueError(f"subject {name} {c}: need a {ndim}D image, got {v.data.shape}")
    return vols


def load_view_subject(name: str, paths: dict, *, resolution: float = 2.0) -> ViewSubject:
    """Resample a subject's contrasts (``contrast -> NIfTI path``) onto its first contrast's working grid.

    Raises:
      ValueError: no contrasts, or an image that is not 3D.
    """
    from jaxreg.pipeline import resample_smooth, working_grid

    vols = load_subject_volumes(name, paths)
    first = next(iter(vols.values()))
    shape, affine, _ = working_grid(first.data.shape, first.affine, resolution)
    images = {c: normalize(np.asarray(resample_smooth(v, shape, affine))[..., 0]) for c, v in vols.items()}
    return ViewSubject(name, images)


def shared_data_subjects(root, names) -> dict:
    """``name -> {contrast: path}`` for entries of ``../shared/data`` named ``folder/case`` (or ``ixi/<id>``, ``mni152``).

    Raises:
      FileNotFoundError: a named case or its images are missing.
    """
    root = pathlib.Path(root)
    out = {}
    for name in names:
        if name == "mni152":
            paths = {"t1": root / "mni152" / "t1.nii.gz"}
        elif name.startswith("ixi/"):
            paths = {"t1": root / "ixi" / f"{name[4:]}_t1.nii.gz"}
        else:
            d = root / name
            paths = {c: d / f"{c}.nii.gz" for c in ("t1", "t2", "flair", "t1c") if (d / f"{c}.nii.gz").is_file()}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if not paths or missing:
            raise FileNotFoundError(f"case {name!r} not found under {root} ({missing or 'no images'})")
        out[name] = paths
    return out


class ViewSource:
    """Random-access source of co-registered view pairs (grain ``MapDataset.source``).

    Example keys: ``fixed``, ``moving`` (``(*crop, 1)`` float32 views in
    [0, 1]; the names follow the training stack's batch layout) and ``same``
    (float32 scalar, 1 when both views are the same image).

    Args:
      subjects: :class:`ViewSubject` list.
      crop: spatial crop size (views are zero-padded if the volume is smaller).
      seed: base seed.
      same_prob: probability of one contrast twice for multi-contrast subjects.
      flip: mirror both views along random axes.
      length: nominal number of examples (grain needs a length).
    """

    def __init__(self, subjects: list[ViewSubject], *, crop, seed: int = 0, same_prob: float = 0.25,
                 flip: bool = True, length: int = 10 ** 8):
        if not subjects:
            raise ValueError("ViewSource needs at least one subject")
        self.subjects, self.crop = subjects, tuple(int(c) for c in crop)
        self.seed, self.same_prob, self.flip, self.length = seed, same_prob, flip, length
        self._fg = [np.argwhere(next(iter(s.images.values())) > 0.05) for s in subjects]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, int(index)])
        k = int(rng.integers(len(self.subjects)))
        s = self.subjects[k]
        names = list(s.images)
        if len(names) == 1 or rng.random() < self.same_prob:
            a = b = names[int(rng.integers(len(names)))]
        else:
            a, b = rng.choice(names, 2, replace=False)
        fg = self._fg[k]
        shape = np.asarray(next(iter(s.images.values())).shape)
        centre = fg[int(rng.integers(len(fg)))] if len(fg) else shape // 2
        crop = np.asarray(self.crop)
        start = np.clip(centre - crop // 2, 0, np.maximum(shape - crop, 0))
        sl = tuple(slice(int(st), int(st + c)) for st, c in zip(start, crop))
        flips = [ax for ax in range(len(crop)) if self.flip and rng.random() < 0.5]

        def view(c):
            v = s.images[c][sl]
            v = np.pad(v, [(0, int(c_ - n)) for c_, n in zip(crop, v.shape)])
            return np.ascontiguousarray(np.flip(v, flips) if flips else v)[..., None].astype(np.float32)

        return {"fixed": view(a), "moving": view(b), "same": np.float32(a == b)}
