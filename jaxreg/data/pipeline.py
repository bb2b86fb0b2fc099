"""Training data: subjects on a common grid and a deterministic grain pipeline of registration pairs.

* :func:`load_subjects` resamples every subject's images (and labels) through
  their NIfTI affines onto one common grid whose size is a multiple of
  ``2 ** levels`` (the grid is enlarged symmetrically, so nothing is cropped
  away), normalises intensities to [0, 1] (0.5-99.5 percentiles), and
  optionally pre-aligns every subject to the first one with jaxreg's affine
  stage (Mattes-style MI), as VoxelMorph assumes affinely aligned inputs.
* :class:`PairSource` is a random-access source: example ``i`` is a function
  of ``(seed, i)`` only, so a grain pipeline over it is deterministic, and
  its iterator state (one index) is checkpointed with the model.
* :func:`make_dataset` batches it with grain.

Pair modes: ``inter`` (two different subjects), ``intra`` (one subject, two
contrasts), ``self`` (one image with itself); any mode can add a random
smooth deformation to the moving image (``deform_voxels``, needed for
``intra``/``self`` since co-registered images are already aligned; with
``deform_fixed`` the fixed image gets an independent one too, so few
subjects still give ever-new inter-subject pairs) and a
random intensity remap of the fixed image (``remap_fixed='random'``: a
cross-contrast pair from one contrast).
"""
from __future__ import annotations

import dataclasses
import math

import grain
import numpy as np
from scipy import ndimage as ndi

from jaxreg.data.manifest import Subject
from jaxreg.io import load_image, load_labels, resample_to_grid
from jaxreg.optimize import normalize_intensity

MODES = ("inter", "intra", "self")


@dataclasses.dataclass
class SubjectData:
    """A subject on the common grid: ``images`` contrast -> ``(*spatial, 1)`` float32 in [0, 1]; ``labels`` ``(*spatial)`` int32 or None."""

    name: str
    images: dict
    labels: np.ndarray | None


def padded_grid(shape, affine, multiple: int):
    """``(shape', affine')``: the grid enlarged symmetrically to sizes divisible by ``multiple``.

    The voxel spacing and orientation stay; the origin moves by the padding
    before each axis so existing voxel centres keep their world positions
    (shifted by an integer number of voxels).
    """
    shape = tuple(int(s) for s in shape)
    new = tuple(int(math.ceil(s / multiple) * multiple) for s in shape)
    before = np.asarray([(n - s) // 2 for n, s in zip(new, shape)], np.float64)
    shift = np.eye(4)
    shift[: len(shape), 3] = -before
    return new, np.asarray(affine, np.float64) @ shift


def normalize(x: np.ndarray) -> np.ndarray:
    """0.5-99.5 percentile window of a single-channel ``(*spatial)`` image to [0, 1] (float32; constant -> 0).

    The same normalisation as :func:`jaxreg.optimize.normalize_intensity`
    (which the instance-optimisation methods and ``jaxreg register`` use).
    """
    return np.asarray(normalize_intensity(np.asarray(x, np.float32)[..., None]))[..., 0]


def load_subjects(subjects: list[Subject], *, contrasts, resolution: float = 2.0, multiple: int = 16,
                  prealign: bool = True, reference: tuple | None = None) -> tuple[list[SubjectData], tuple, np.ndarray]:
    """Load subjects onto a common 3D grid.

    Args:
      subjects: manifest rows.
      contrasts: contrasts to load (each subject must have them).
      resolution: voxel size (mm) of the common grid.
      multiple: grid sizes are padded to a multiple of this (``2 ** levels``).
      prealign: affinely register each subject's first contrast to the
        reference subject's (jaxreg affine stage, MI) before resampling.
      reference: ``(shape, affine)`` of the common grid; default: the first
        subject's first contrast at ``resolution``, padded.

    Returns:
      ``(data, shape, affine)``: the subjects on the grid and the grid.

    Raises:
      ValueError: missing contrasts, non-3D images.
    """
    from jaxreg.optimize import register_instance
    from jaxreg.pipeline import PREALIGN_CONFIG, working_grid

    contrasts = tuple(contrasts)
    for s in subjects:
        missing = [c for c in contrasts if c not in s.images]
        if missing:
            raise ValueError(f"subject {s.name} lacks contrasts {missing}")
    if reference is None:
        first = load_image(subjects[0].images[contrasts[0]])
        shape, affine, _ = working_grid(first.data.shape, first.affine, resolution)
        shape, affine = padded_grid(shape, affine, multiple)
    else:
        shape, affine = tuple(reference[0]), np.asarray(reference[1], np.float64)
    out = []
    ref_img = None
    cfg = PREALIGN_CONFIG
    for k, s in enumerate(subjects):
        vols = {c: load_image(s.images[c]) for c in contrasts}
        for c, v in vols.items():
            if v.data.ndim != 3:
                raise ValueError(f"subject {s.name} {c}: need a 3D image, got {v.data.shape}")
        lab = load_labels(s.labels) if s.labels is not None else None
        matrix = None
        if prealign and k > 0:
            first = vols[contrasts[0]]
            mov = normalize(resample_to_grid(first.data, first.affine, shape, affine))[..., None]
            matrix = np.asarray(register_instance(ref_img, mov, config=cfg).matrix, np.float64)
        images = {c: normalize(resample_to_grid(v.data, v.affine, shape, affine, matrix=matrix))[..., None]
                  for c, v in vols.items()}
        labels = None if lab is None else resample_to_grid(lab.data, lab.affine, shape, affine, order=0,
                                                           matrix=matrix).astype(np.int32)
        if k == 0:
            ref_img = images[contrasts[0]]
        out.append(SubjectData(s.name, images, labels))
    return out, shape, affine


# ----------------------------------------------------------------------------- augmentation (numpy, host side)

def _bspline_matrix(n: int, spacing: int) -> np.ndarray:
    """``(n, c)`` cubic B-spline weights of ``c`` control points ``spacing`` voxels apart, centred on ``n`` voxels."""
    c = int(math.ceil((n - 1) / spacing)) + 3
    centres = (np.arange(c) - 1.0) * spacing - ((c - 3) * spacing - (n - 1)) / 2.0
    t = np.abs(np.arange(n, dtype=np.float64)[:, None] - centres[None, :]) / spacing
    return np.where(t < 1, 2.0 / 3.0 - t ** 2 + t ** 3 / 2.0, np.where(t < 2, (2.0 - t) ** 3 / 6.0, 0.0))


def random_smooth_disp(rng: np.random.Generator, shape, *, magnitude: float, spacing: int = 16) -> np.ndarray:
    """``(*shape, D)`` smooth random displacement (voxels), mean |u| equal to ``magnitude``.

    Gaussian noise on a control grid ``spacing`` voxels apart, interpolated
    by cubic B-splines (separable, so a 3D field costs a few small matrix
    products); small magnitudes relative to ``spacing`` keep it invertible.
    """
    d = len(shape)
    mats = [_bspline_matrix(int(n), int(spacing)) for n in shape]
    noise = rng.standard_normal((d, *(m.shape[1] for m in mats)))
    u = noise
    for ax, m in enumerate(mats):  # contract control axis ax+1 with its B-spline matrix
        u = np.moveaxis(np.tensordot(m, u, axes=([1], [ax + 1])), 0, ax + 1)
    u = np.moveaxis(u, 0, -1)
    mean = float(np.mean(np.linalg.norm(u, axis=-1)))
    return (u * (magnitude / max(mean, 1e-6))).astype(np.float32)


def warp_numpy(image: np.ndarray, disp: np.ndarray, *, order: int = 1, mode: str = "constant") -> np.ndarray:
    """``image(x + disp(x))`` for ``(*spatial[, C])`` numpy arrays (order 0 for labels).

    ``mode``: ``scipy.ndimage.map_coordinates`` padding, ``"constant"`` (zeros
    outside, default) or ``"nearest"`` (border values).
    """
    d = disp.shape[-1]
    coords = np.indices(disp.shape[:-1], dtype=np.float32) + np.moveaxis(disp, -1, 0)
    if image.ndim == d:
        return ndi.map_coordinates(image, coords, order=order, mode=mode, cval=0)
    return np.stack([ndi.map_coordinates(image[..., c], coords, order=order, mode=mode, cval=0)
                     for c in range(image.shape[-1])], axis=-1)


def invert_numpy(disp: np.ndarray, *, iterations: int = 20) -> np.ndarray:
    """Inverse displacement by fixed-point iteration ``v <- -u(x + v(x))`` in NumPy (border padding).

    The NumPy twin of :func:`jaxreg.spatial.invert` (equal to it to float
    precision, tested) for the data pipeline, whose examples are built in
    grain's threads: calling JAX there, beside the jitted training step, was
    measured to crash the process (segfaults in two 2D training runs with
    ``keep_truth``).
    """
    disp = np.asarray(disp, np.float32)
    v = -disp
    for _ in range(iterations):
        v = -warp_numpy(disp, v, mode="nearest")
    return v.astype(np.float32)


def random_remap(rng: np.random.Generator, image: np.ndarray, *, knots: int = 6) -> np.ndarray:
    """Random non-monotone intensity curve on [0, 1] (background 0 stays 0): a synthetic contrast."""
    xs = np.linspace(0.0, 1.0, knots)
    ys = rng.uniform(0.0, 1.0, knots)
    out = np.interp(image, xs, ys).astype(np.float32)
    return np.where(image > 0, out, 0.0).astype(np.float32)


def sin_remap(image: np.ndarray) -> np.ndarray:
    """``sin(0.9 pi x)`` of a [0, 1]-normalised image (background 0 stays 0).

    The curve of ``benchmarks/io_registration.py``'s cross-contrast IXI case;
    there ``x`` is the raw scan divided by its 99th foreground percentile,
    here the image normalised by :func:`normalize` (0.5-99.5 percentiles of
    all voxels), so the two remapped images differ by that intensity scaling.
    """
    return np.where(image > 0, np.sin(0.9 * np.pi * np.clip(image, 0, 1)), 0.0).astype(np.float32)


# ----------------------------------------------------------------------------- pairs

class PairSource:
    """Random-access registration pairs; example ``i`` depends only on ``(seed, i)``.

    Each example is a dict of numpy arrays: ``fixed``/``moving`` ``(*spatial,
    1)`` float32 and, when every subject has labels, ``fixed_labels`` /
    ``moving_labels`` ``(*spatial)`` int32 (the moving labels follow the
    moving image's deformation, the fixed labels the fixed image's when
    ``deform_fixed``). With ``keep_truth``, ``self``/``intra`` examples with a
    deformation of the moving image only also hold ``disp_true`` ``(*spatial,
    D)`` float32, the displacement (voxels) that registers them
    (``moving(x + disp_true(x))`` lies on the fixed image: the inverse of the
    applied deformation, :func:`jaxreg.spatial.invert`), for endpoint errors
    in validation; training sources leave it out (20 resampling passes per
    example). ``slice_axis`` turns 3D subjects into 2D
    examples (a random slice through the central half of the foreground).
    With ``remap_fixed`` and ``keep_target`` an example also holds
    ``fixed_target``, the fixed image before its intensity remap: a loss may
    compare the warped moving image with it while the network sees the
    remapped contrast (contrast augmentation of the input only).
    ``remap_prob`` < 1 remaps only that fraction of the examples (the rest
    keep the fixed contrast; ``fixed_target`` is then the fixed image itself).
    ``flip`` mirrors each pair as a whole along random axes (both images,
    labels and ``disp_true`` together), so that no constant, position-bound
    displacement lowers the loss: without it, networks trained on few
    subjects were measured to output one input-independent field.

    Several moving contrasts: ``moving_contrast`` may be a tuple; each
    example draws one (the same for the ``contrast_block`` consecutive
    examples ``i // contrast_block``, so that a batch of that size holds one
    contrast pair, as ContraReg's per-contrast feature extractors need). With
    ``contrast_names`` every example also holds ``fixed_contrast`` and
    ``moving_contrast``, int32 indices into it. ``inter_prob`` > 0 makes that
    fraction of ``intra`` examples inter-subject (moving contrast of another
    subject). ``remap_moving`` names subjects whose moving image gets a
    random non-monotone intensity curve per example (:func:`random_remap`): a
    single-contrast subject then gives cross-contrast pairs of exact anatomy.

    Raises:
      ValueError: unknown mode/contrasts, or too few subjects for ``inter``.
    """

    def __init__(self, subjects: list[SubjectData], *, mode: str = "inter", fixed_contrast: str = "t1",
                 moving_contrast: str = "t1", seed: int = 0, deform_voxels: float = 0.0,
                 deform_spacing: int = 16, remap_fixed: str | None = None, slice_axis: int | None = None,
                 keep_target: bool = False, remap_prob: float = 1.0, deform_fixed: bool = False,
                 flip: bool = False, keep_truth: bool = False, length: int = 2 ** 31 - 1,
                 contrast_block: int = 1, contrast_names: tuple | None = None, inter_prob: float = 0.0,
                 remap_moving: tuple = ()):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "inter" and len(subjects) < 2:
            raise ValueError("mode 'inter' needs at least 2 subjects")
        moving_contrasts = (moving_contrast,) if isinstance(moving_contrast, str) else tuple(moving_contrast)
        if not moving_contrasts:
            raise ValueError("moving_contrast must name at least one contrast")
        if contrast_names is not None:
            unknown = [c for c in (fixed_contrast, *moving_contrasts) if c not in contrast_names]
            if unknown:
                raise ValueError(f"contrasts {unknown} are not in contrast_names {list(contrast_names)}")
        if contrast_block < 1:
            raise ValueError(f"contrast_block must be >= 1, got {contrast_block}")
        if not 0.0 <= inter_prob <= 1.0 or (inter_prob > 0 and len(subjects) < 2):
            raise ValueError(f"inter_prob must be in [0, 1] (and > 0 needs 2 subjects), got {inter_prob}")
        self.moving_contrasts, self.contrast_block = moving_contrasts, int(contrast_block)
        self.contrast_names = None if contrast_names is None else tuple(contrast_names)
        self.inter_prob = float(inter_prob)
        self.remap_moving = frozenset(remap_moving)
        for s in subjects:
            for c in (fixed_contrast, *moving_contrasts):
                if c not in s.images:
                    raise ValueError(f"subject {s.name} has no contrast {c!r} (has {sorted(s.images)})")
        if remap_fixed not in (None, "random", "sin"):
            raise ValueError(f"remap_fixed must be None, 'random' or 'sin', got {remap_fixed!r}")
        self.subjects, self.mode, self.seed = subjects, mode, int(seed)
        self.fixed_contrast = fixed_contrast
        self.deform_voxels, self.deform_spacing = float(deform_voxels), int(deform_spacing)
        self.deform_fixed, self.flip = bool(deform_fixed), bool(flip)
        self.keep_truth = bool(keep_truth) and mode != "inter" and not deform_fixed and not inter_prob
        self.remap_fixed, self.slice_axis, self.length = remap_fixed, slice_axis, int(length)
        self.with_labels = all(s.labels is not None for s in subjects)
        self.keep_target = bool(keep_target) and remap_fixed is not None
        if not 0.0 <= remap_prob <= 1.0:
            raise ValueError(f"remap_prob must be in [0, 1], got {remap_prob}")
        self.remap_prob = float(remap_prob)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, int(index)])
        n = len(self.subjects)
        if self.mode == "inter" or (self.inter_prob > 0 and rng.uniform() < self.inter_prob):
            i, j = rng.choice(n, size=2, replace=False)
        else:
            i = j = int(rng.integers(n))
        fs, ms = self.subjects[i], self.subjects[j]
        fixed = fs.images[self.fixed_contrast]
        mc = self.moving_contrasts[0]
        if len(self.moving_contrasts) > 1:
            block = np.random.default_rng([self.seed, int(index) // self.contrast_block, 7])
            mc = self.moving_contrasts[int(block.integers(len(self.moving_contrasts)))]
        mc = mc if self.mode != "self" else self.fixed_contrast
        moving = ms.images[mc]
        fl, ml = (fs.labels, ms.labels) if self.with_labels else (None, None)
        if self.slice_axis is not None:
            fg = np.nonzero(np.any(fixed[..., 0] > 0.05, axis=tuple(a for a in range(3) if a != self.slice_axis)))[0]
            lo, hi = (fg.min(), fg.max()) if fg.size else (0, fixed.shape[self.slice_axis] - 1)
            q = (hi - lo) // 4
            k = int(rng.integers(lo + q, max(lo + q + 1, hi - q + 1)))
            take = lambda a: None if a is None else np.take(a, k, axis=self.slice_axis)  # noqa: E731
            fixed, moving, fl, ml = take(fixed), take(moving), take(fl), take(ml)
        fixed = np.array(fixed, np.float32)
        moving = np.array(moving, np.float32)
        if ms.name in self.remap_moving:
            moving = random_remap(rng, moving)
        disp_true = None
        if self.deform_voxels > 0:
            u = random_smooth_disp(rng, moving.shape[:-1], magnitude=self.deform_voxels, spacing=self.deform_spacing)
            moving = warp_numpy(moving, u)
            ml = None if ml is None else warp_numpy(ml, u, order=0)
            if self.keep_truth:
                disp_true = invert_numpy(u)
            if self.deform_fixed:
                u = random_smooth_disp(rng, fixed.shape[:-1], magnitude=self.deform_voxels, spacing=self.deform_spacing)
                fixed = warp_numpy(fixed, u)
                fl = None if fl is None else warp_numpy(fl, u, order=0)
        target = fixed
        remap = self.remap_fixed if self.remap_prob >= 1.0 or rng.uniform() < self.remap_prob else None
        if remap == "random":
            fixed = random_remap(rng, fixed)
        elif remap == "sin":
            fixed = sin_remap(fixed)
        out = {"fixed": fixed, "moving": moving}
        if self.keep_target:
            out["fixed_target"] = target
        if disp_true is not None:
            out["disp_true"] = disp_true
        if self.with_labels:
            out["fixed_labels"] = np.asarray(fl, np.int32)
            out["moving_labels"] = np.asarray(ml, np.int32)
        if self.contrast_names is not None:
            out["fixed_contrast"] = np.int32(self.contrast_names.index(self.fixed_contrast))
            out["moving_contrast"] = np.int32(self.contrast_names.index(mc))
        if self.flip:
            out = flip_example(out, rng.integers(0, 2, size=fixed.ndim - 1).astype(bool))
        return out


def flip_example(example: dict, axes) -> dict:
    """Mirror every array of a pair along the spatial axes where ``axes`` is True.

    Images and labels are reversed along those axes; displacements
    (``disp_true``) also change the sign of those components, so the flipped
    pair is registered by the flipped field.
    """
    axes = tuple(int(a) for a in np.nonzero(np.asarray(axes, bool))[0])
    if not axes:
        return example
    out = {}
    for k, v in example.items():
        if np.ndim(v) == 0:  # per-example scalars (contrast indices)
            out[k] = v
            continue
        v = np.flip(v, axis=axes)
        if k == "disp_true":
            sign = np.ones(v.shape[-1], v.dtype)
            sign[list(axes)] = -1
            v = v * sign
        out[k] = np.ascontiguousarray(v)
    return out


def make_dataset(source: PairSource, *, batch_size: int, start: int = 0) -> grain.IterDataset:
    """Deterministic grain pipeline: batches ``[start + b * batch_size, ...)`` of ``source``.

    Iterate with ``it = iter(ds)``; ``it.get_state()`` / ``it.set_state()``
    save and restore the position (checkpointed with the model by ``train/``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = grain.MapDataset.source(source)
    if start:
        ds = ds[start:]
    return ds.batch(batch_size, drop_remainder=True).to_iter_dataset()


def fixed_pairs(subjects: list[SubjectData], pairs, *, fixed_contrast="t1", moving_contrast="t1",
                remap_fixed: str | None = None) -> list[dict]:
    """Validation examples for explicit ``(moving_index, fixed_index)`` pairs (no randomness)."""
    out = []
    for mi, fi in pairs:
        fs, ms = subjects[fi], subjects[mi]
        fixed = fs.images[fixed_contrast]
        fixed = sin_remap(fixed) if remap_fixed == "sin" else np.array(fixed)
        ex = {"fixed": fixed, "moving": np.array(ms.images[moving_contrast]), "name": f"{ms.name}->{fs.name}"}
        if fs.labels is not None and ms.labels is not None:
            ex["fixed_labels"], ex["moving_labels"] = fs.labels, ms.labels
        out.append(ex)
    return out
