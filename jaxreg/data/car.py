"""CAR data: brain images of the shared data on one skull-stripped, affinely aligned grid, and unseen-contrast tests.

CAR trains on one contrast (T1) and is tested on contrasts it never saw
(Wang et al., WBIR 2024, Sec. 3). :func:`load_brain_subjects` puts every
named case of ``../shared/data`` (``mni152``, ``ixi/<id>``,
``brats_space/<case>``, ``ms_mni/<case>``, ``ixi_t2/<case>``) onto the grid
of the first one at ``resolution`` mm. Cases with a skull are stripped with
the brain mask their folder provides (IXI: the DLMUSE labels > 0; MNI152: the
grey + white matter maps; ``ixi_t2``: the HD-BET masks are already applied),
so that all images look alike (the brats_space and ms_mni cases come
skull-stripped). Each case's T1 is moved onto the first case's by the
translation between their brain centroids and then affinely registered
(jaxreg's affine stage, MI), and all its contrasts follow that transform.
:func:`known_deformation_examples` builds the unseen-contrast test: fixed =
the T1 slice, moving = each contrast's slice of the same subject warped by
one known random deformation per slice (the same for every contrast, so the
contrasts are compared on identical problems).
"""
from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
from scipy import ndimage as ndi

from jaxreg.data.pipeline import SubjectData, normalize, padded_grid, random_smooth_disp, warp_numpy
from jaxreg.data.views import load_subject_volumes, shared_data_subjects
from jaxreg.io import load_image, resample_to_grid
from jaxreg.spatial import invert


def _world_centroid(vol, mask) -> np.ndarray:
    """World (mm) centroid of a volume's foreground (> 5 % of its 99th percentile, inside ``mask`` if given)."""
    data = vol.data.astype(np.float32)
    if mask is not None:
        data = data * (resample_to_grid(mask[0], mask[1], data.shape, vol.affine) > 0.5)
    fg = np.argwhere(data > 0.05 * np.percentile(data[data > 0], 99)) if np.any(data > 0) else np.zeros((1, 3))
    return vol.affine[:3, :3] @ fg.mean(0) + vol.affine[:3, 3]


def brain_mask_volume(root, name: str, labels=None):
    """``(data, affine)`` of the brain mask that strips case ``name``, or None if it comes skull-stripped.

    IXI: DLMUSE labels > 0 (``labels``, the loaded label volume, or read from
    ``root``), holes filled, dilated by one voxel (the labels leave out sulcal
    CSF); MNI152: grey + white matter probability > 25 %, holes filled,
    dilated by one voxel.
    """
    root = pathlib.Path(root)
    if name.startswith("ixi/"):
        lab = labels if labels is not None else load_image(root / "ixi" / f"{name[4:]}_labels.nii.gz")
        m = lab.data > 0
    elif name == "mni152":
        gm, wm = load_image(root / "mni152" / "gm.nii.gz"), load_image(root / "mni152" / "wm.nii.gz")
        lab = gm
        m = (gm.data.astype(np.float32) + wm.data.astype(np.float32)) > 0.25 * 255
    else:
        return None
    m = ndi.binary_dilation(ndi.binary_fill_holes(m), iterations=1)
    return m.astype(np.float32), lab.affine


LESION_LABELS = {"brats_space": "tumor_seg.nii.gz", "ms_mni": "lesion.nii.gz", "brats2015": "seg.nii.gz"}


def load_brain_subjects(root, names, *, resolution: float = 2.0, multiple: int = 16, crop=None,
                        with_labels: bool = True, lesion_labels: bool = False) -> tuple[list[SubjectData], tuple, np.ndarray]:
    """Load cases of ``../shared/data`` onto the first case's grid, skull-stripped and affinely aligned to it.

    Args:
      root: the shared data folder.
      names: case names (see :func:`jaxreg.data.views.shared_data_subjects`); the first defines the grid.
      resolution: grid spacing (mm).
      multiple: grid sizes are padded to a multiple of this.
      crop: optional central crop of the grid (sizes divisible by ``multiple``).
      with_labels: keep the IXI label maps (148 DLMUSE labels) as ``labels``.
      lesion_labels: also keep the tumour / lesion maps of ``brats_space``
        (``tumor_seg``), ``ms_mni`` (``lesion``) and ``brats2015`` (``seg``)
        as ``labels`` (nearest-neighbour resampled).

    Returns:
      ``(subjects, shape, affine)``; each subject's images are ``(*shape, 1)``
      float32 in [0, 1] (0.5-99.5 percentiles inside the stripped image), zero
      outside the brain.

    Raises:
      FileNotFoundError: a named case is missing. ValueError: a non-3D image.
    """
    from jaxreg.optimize import register_instance
    from jaxreg.pipeline import PREALIGN_CONFIG, working_grid

    root = pathlib.Path(root)
    paths = shared_data_subjects(root, names)
    shape = affine = None
    out, ref = [], None
    for name, p in paths.items():
        vols = load_subject_volumes(name, p)
        first = vols["t1"] if "t1" in vols else next(iter(vols.values()))
        if shape is None:
            shape, affine, _ = working_grid(first.data.shape, first.affine, resolution)
            shape, affine = padded_grid(shape, affine, multiple)
            if crop:
                crop = tuple(int(c) for c in crop)
                before = np.asarray([(n - c) // 2 for n, c in zip(shape, crop)], np.float64)
                shift = np.eye(4)
                shift[:3, 3] = before
                shape, affine = crop, affine @ shift
        lab = load_image(root / "ixi" / f"{name[4:]}_labels.nii.gz") if name.startswith("ixi/") else None
        mask = brain_mask_volume(root, name, labels=lab)
        lesion = LESION_LABELS.get(name.split("/")[0])
        if lesion_labels and lesion and (root / name / lesion).is_file():
            lab = load_image(root / name / lesion)

        def on_grid(data, aff, matrix, order=1):
            return resample_to_grid(data, aff, shape, affine, order=order, matrix=matrix)

        def stripped(v, matrix):
            img = on_grid(v.data.astype(np.float32), v.affine, matrix)
            if mask is not None:
                img = img * (on_grid(mask[0], mask[1], matrix) > 0.5)
            return normalize(img)[..., None]

        matrix = None
        centre = _world_centroid(first, mask)
        if ref is not None:
            # start from the centroids' translation (brats_space's SRI24 headers lie ~190 mm from MNI's)
            shift = np.eye(4)
            shift[:3, 3] = np.linalg.solve(affine[:3, :3], centre - ref_centre)
            mov = stripped(first, shift)
            matrix = shift @ np.asarray(register_instance(ref, mov, config=PREALIGN_CONFIG).matrix, np.float64)
        else:
            ref_centre = centre
        images = {c: stripped(v, matrix) for c, v in vols.items()}
        if ref is None:
            ref = images["t1"] if "t1" in images else next(iter(images.values()))
        labels = None
        if (with_labels or lesion_labels) and lab is not None:
            labels = on_grid(np.asarray(lab.data, np.float32), lab.affine, matrix, order=0).astype(np.int32)
        out.append(SubjectData(name, images, labels))
    return out, tuple(shape), np.asarray(affine)


def central_slices(image: np.ndarray, num: int, *, axis: int = 2) -> list[int]:
    """``num`` evenly spaced slice indices through the central half of the foreground (> 0.05) along ``axis``."""
    fg = np.nonzero(np.any(image[..., 0] > 0.05, axis=tuple(a for a in range(3) if a != axis)))[0]
    lo, hi = (int(fg.min()), int(fg.max())) if fg.size else (0, image.shape[axis] - 1)
    q = (hi - lo) // 4
    return [int(round(k)) for k in np.linspace(lo + q, hi - q, num)]


def known_deformation_examples(subjects: list[SubjectData], *, num_slices: int = 8, deform_voxels: float = 2.0,
                               deform_spacing: int = 16, seed: int = 0, axis: int | None = 2,
                               fixed_contrast: str = "t1", contrasts=None) -> list[dict]:
    """Unseen-contrast test pairs with a known answer, 2D slices (``axis``) or whole 3D volumes (``axis=None``).

    For each subject and slice one random smooth deformation ``u`` (mean
    ``deform_voxels`` voxels) is drawn; for every contrast ``c`` of the
    subject (``fixed_contrast`` too, the mono-contrast reference) the example
    is ``fixed`` = the ``fixed_contrast`` slice, ``moving`` = the ``c`` slice
    warped by ``u``, ``disp_true = invert(u)`` (voxels; it registers them),
    ``contrast = c``, ``case`` = the subject name; a subject with ``labels``
    (tumour / lesion) also gives ``fixed_labels`` and ``moving_labels`` (the
    labels warped by ``u``). ``contrasts`` restricts the moving contrasts.
    """
    out = []
    for si, s in enumerate(subjects):
        ref = s.images[fixed_contrast]
        ks = central_slices(ref, num_slices, axis=axis) if axis is not None else [None]
        for j, k in enumerate(ks):
            rng = np.random.default_rng([seed, si, j])
            take = (lambda a: np.take(a, k, axis=axis)) if axis is not None else (lambda a: a)  # noqa: E731
            fixed = np.array(take(ref), np.float32)
            u = random_smooth_disp(rng, fixed.shape[:-1], magnitude=deform_voxels, spacing=deform_spacing)
            truth = np.asarray(invert(jnp.asarray(u)), np.float32)
            labels = {}
            if s.labels is not None:
                lab = np.asarray(take(s.labels), np.int32)
                labels = {"fixed_labels": lab, "moving_labels": warp_numpy(lab, u, order=0).astype(np.int32)}
            for c, img in s.images.items():
                if contrasts is not None and c not in contrasts:
                    continue
                out.append({"fixed": fixed, "moving": warp_numpy(np.array(take(img), np.float32), u),
                            "disp_true": truth, "contrast": c, "case": s.name, **labels,
                            "name": f"{s.name} {c}->{fixed_contrast}" + (f" slice {k}" if k is not None else "")})
    return out
