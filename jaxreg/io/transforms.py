"""ITK/ANTs-compatible dense displacement fields (world space, mm).

Inside jaxreg a registration result is a map from fixed voxels to moving
voxels, ``y = x + u(x)``, with ``u`` a ``(X, Y, Z, 3)`` voxel displacement on
the fixed grid that already includes any difference between the two grids
(``y`` is in the moving image's own voxels). ITK stores the same map as a
displacement field on the fixed grid in physical LPS coordinates:
``T(p) = p + d(p)`` maps a fixed physical point ``p`` to the moving physical
point, and resampling pulls back, ``warped(p) = moving(T(p))`` (ITK Software
Guide, Book 2, the ``DisplacementFieldTransform`` and ``ResampleImageFilter``
sections). ITK interpolates the field linearly, uses its edge value up to half
a voxel outside the field's grid and ``d = 0`` beyond (``IsInsideBuffer``);
images are resampled with the same half-voxel rule and 0 outside.

NIfTI affines are RAS+ and ITK points are LPS: ``p_LPS = diag(-1, -1, 1) p_RAS``.
Hence ``d(x) = LPS(A_m y) - LPS(A_f x)``.

On-disk layout (what ``antsRegistration`` and ``ants.image_write`` write):
shape ``(X, Y, Z, 1, 3)``, float32, ``intent_code`` 1007
(``NIFTI_INTENT_VECTOR``, NIfTI-1 header spec), sform = qform = the fixed
affine (code 1), and the three components are the **LPS** displacement in
mm, stored as is. ITK's NIfTI reader converts the affine from RAS to LPS but
does not touch vector components: checked with antspyx 0.6.3, a constant
stored field ``(4, 0, 0)`` on a RAS-axis-aligned 2 mm grid moved the sampled
point by ``-2`` voxels (``-4`` mm along R, i.e. ``+4`` mm along L), and
``ants.image_write`` of a vector image stores its components unchanged
(tests/io/test_io_itk.py re-checks both directions on oblique grids).
"""
import pathlib

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
from jaxtyping import Float

from jaxreg.io.nifti import Volume, _check_affine, _grid_points, _sample, save_image

_ArrayLike = np.ndarray | jax.Array
_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])
NIFTI_INTENT_VECTOR = 1007
NIFTI_INTENT_DISPVECT = 1006


def _check_field(field, name: str) -> np.ndarray:
    f = np.asarray(field)
    if f.ndim != 4 or f.shape[-1] != 3:
        if f.ndim == 3 and f.shape[-1] == 2:
            raise ValueError(f"{name}: 2D displacement fields are not supported for ITK warps, got {f.shape}")
        raise ValueError(f"{name} must be (X, Y, Z, 3), got {f.shape}")
    return f


def voxel_disp_to_world(
    disp: Float[_ArrayLike, "X Y Z 3"],
    fixed_affine: Float[_ArrayLike, "4 4"],
    moving_affine: Float[_ArrayLike, "4 4"],
) -> Float[np.ndarray, "X Y Z 3"]:
    """Convert a fixed-grid voxel displacement into an ITK world displacement (LPS mm).

    ``d(x) = LPS(A_m (x + u(x))) - LPS(A_f x)``, computed in float32 without forming world
    coordinates (the grid term is separable), so the error stays ~1e-5 mm.

    Args:
      disp: ``(X, Y, Z, 3)`` voxel displacement ``u`` on the fixed grid; ``x +
        u(x)`` is a voxel of the **moving** image (grid differences included,
        e.g. ``affine_to_disp(grid_to_grid_matrix(A_f, A_m), shape)`` for
        "no motion").
      fixed_affine: ``(4, 4)`` fixed voxel -> RAS mm.
      moving_affine: ``(4, 4)`` moving voxel -> RAS mm.

    Returns:
      ``(X, Y, Z, 3)`` float32 displacement in mm, LPS components, ready for
      :func:`save_itk_warp` with ``fixed_affine``.

    Raises:
      ValueError: if ``disp`` is not ``(X, Y, Z, 3)`` (2D is not supported)
        or an affine is invalid.

    References:
      ITK Software Guide, Book 2, ``DisplacementFieldTransform``.
    """
    u = _check_field(disp, "disp")
    a_f = _check_affine(fixed_affine, "fixed_affine")
    a_m = _check_affine(moving_affine, "moving_affine")
    # q - p = A_m u + (A_m - A_f) x + (t_m - t_f): the grid term is separable
    # over the axes, so no (X, Y, Z, 3) float64 grid is built (3x faster at
    # 1 mm) and nothing cancels between large world coordinates.
    # (float32 throughout: 1 mm fields are 27M values, and float64 took 1.2 s per field there)
    lin_m = (a_m[:3, :3].T * _RAS_TO_LPS).astype(np.float32)
    diff = (a_m[:3, :3] - a_f[:3, :3]).T * _RAS_TO_LPS
    out = np.asarray(u, np.float32).reshape(-1, 3) @ lin_m
    out = out.reshape(u.shape)
    out += ((a_m[:3, 3] - a_f[:3, 3]) * _RAS_TO_LPS).astype(np.float32)
    for ax, n in enumerate(u.shape[:3]):
        shape = [1, 1, 1, 3]
        shape[ax] = n
        out += (np.arange(n, dtype=np.float64)[:, None] * diff[ax]).astype(np.float32).reshape(shape)
    return out


def _itk_sample(image, coords: np.ndarray, order: int):
    """Sample as ITK's interpolators do: clamped inside ``[-0.5, n - 0.5)``, 0 outside."""
    shape = np.asarray(image.shape[:3])
    inside = np.all((coords >= -0.5) & (coords < shape - 0.5), axis=-1)
    vals = np.asarray(_sample(jnp.asarray(image), jnp.asarray(coords, jnp.float32), order=order, padding="border"))
    mask = inside.reshape(inside.shape + (1,) * (vals.ndim - inside.ndim))
    return np.where(mask, vals, np.zeros((), vals.dtype))


def world_warp_to_voxel_disp(
    d_lps: Float[_ArrayLike, "X Y Z 3"],
    warp_affine: Float[_ArrayLike, "4 4"],
    moving_affine: Float[_ArrayLike, "4 4"],
    *,
    ref_shape=None,
    ref_affine: Float[_ArrayLike, "4 4"] | None = None,
) -> Float[np.ndarray, "*ref 3"]:
    """Convert an ITK world warp into a voxel displacement into the moving image.

    For every reference voxel ``r``: ``p = A_ref r``; the warp is evaluated at
    ``p`` as ITK does (linear interpolation of the field, the edge value within
    half a voxel outside its grid, zero displacement beyond); then
    ``y = A_m^-1 RAS(LPS(p) + d)`` and the result is ``y - r``.

    Args:
      d_lps: ``(X, Y, Z, 3)`` world displacement (mm, LPS components) on the
        warp's grid, e.g. from :func:`load_itk_warp`.
      warp_affine: ``(4, 4)`` voxel -> RAS mm of the warp's grid.
      moving_affine: ``(4, 4)`` voxel -> RAS mm of the moving image.
      ref_shape: spatial shape of the grid to evaluate on (default: the warp's).
      ref_affine: ``(4, 4)`` affine of that grid (default: ``warp_affine``).

    Returns:
      ``(*ref_shape, 3)`` float32 voxel displacement ``u`` with ``r + u(r)`` in
      moving voxels; the inverse of :func:`voxel_disp_to_world` on the
      warp's own grid.

    Raises:
      ValueError: on bad shapes/affines, or if only one of ``ref_shape`` and
        ``ref_affine`` is given.

    References:
      ITK Software Guide, Book 2, ``DisplacementFieldTransform``;
      ``itk::ImageFunction::IsInsideBuffer`` for the half-voxel border.
    """
    r, y = _warp_coords(d_lps, warp_affine, moving_affine, ref_shape, ref_affine)
    return (y - r).astype(np.float32)


def _warp_coords(d_lps, warp_affine, moving_affine, ref_shape, ref_affine):
    """Reference voxels ``r`` and the moving voxels ``y`` they map to (float64)."""
    d = _check_field(d_lps, "d_lps").astype(np.float32)
    a_w = _check_affine(warp_affine, "warp_affine")
    a_m = _check_affine(moving_affine, "moving_affine")
    if (ref_shape is None) != (ref_affine is None):
        raise ValueError("world_warp_to_voxel_disp: give both ref_shape and ref_affine, or neither")
    if ref_shape is None:
        ref_shape, a_r = d.shape[:3], a_w
    else:
        ref_shape = tuple(int(s) for s in ref_shape)
        if len(ref_shape) != 3:
            raise ValueError(f"world_warp_to_voxel_disp: ref_shape must be 3D (2D is not supported), got {ref_shape}")
        a_r = _check_affine(ref_affine, "ref_affine")
    r = _grid_points(ref_shape)
    p = r @ a_r[:3, :3].T + a_r[:3, 3]
    if a_r is a_w:
        disp = d.astype(np.float64)
    else:
        g = np.linalg.solve(a_w, a_r)
        disp = _itk_sample(d, r @ g[:3, :3].T + g[:3, 3], order=1).astype(np.float64)
    q = p + disp * _RAS_TO_LPS  # the LPS flip is its own inverse
    y = (q - a_m[:3, 3]) @ np.linalg.inv(a_m[:3, :3]).T
    return r, y


def save_itk_warp(path, d_lps: Float[_ArrayLike, "X Y Z 3"], fixed_affine: Float[_ArrayLike, "4 4"], *,
                  overwrite: bool = False) -> pathlib.Path:
    """Save a world displacement field as an ITK/ANTs NIfTI warp, atomically.

    Writes shape ``(X, Y, Z, 1, 3)``, float32, ``intent_code`` 1007
    (``NIFTI_INTENT_VECTOR``), LPS components as given, with ``fixed_affine``
    as sform and qform (code 1). ``antsApplyTransforms -t path`` (or
    ``ants.apply_transforms(..., transformlist=[path])``) then resamples a
    moving image onto the fixed grid exactly like :func:`apply_transform`.

    Args:
      path: ``.nii.gz`` or ``.nii`` destination.
      d_lps: ``(X, Y, Z, 3)`` displacement in mm, LPS components (from
        :func:`voxel_disp_to_world`).
      fixed_affine: ``(4, 4)`` voxel -> RAS mm of the field's (fixed) grid.
        Must have orthogonal axes: ITK grids cannot be sheared.
      overwrite: replace an existing file.

    Returns:
      The path written.

    Raises:
      FileExistsError: if ``path`` exists and ``overwrite`` is False.
      ValueError: on a 2D or badly shaped field, NaN/Inf, or a sheared affine.

    References:
      NIfTI-1 header spec, ``intent_code`` / ``NIFTI_INTENT_VECTOR``; ANTs
      warp file layout (``antsRegistration`` output ``*Warp.nii.gz``).
    """
    d = _check_field(d_lps, "d_lps").astype(np.float32)
    a = _check_affine(fixed_affine, "fixed_affine")
    cols = a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0)
    skew = np.abs(cols.T @ cols - np.eye(3)).max()
    if skew > 1e-4:
        raise ValueError(f"save_itk_warp: fixed_affine axes are not orthogonal (max |cos| {skew:.2g}); "
                         "ITK cannot represent a sheared grid")
    return save_image(path, d[:, :, :, None, :], a, overwrite=overwrite, dtype=np.float32,
                      intent=NIFTI_INTENT_VECTOR)


def load_itk_warp(path) -> tuple[Float[np.ndarray, "X Y Z 3"], np.ndarray]:
    """Load an ITK/ANTs NIfTI displacement field.

    Args:
      path: NIfTI file of shape ``(X, Y, Z, 1, 3)`` with ``intent_code`` 1007
        (``NIFTI_INTENT_VECTOR``, what ITK writes) or 1006
        (``NIFTI_INTENT_DISPVECT``).

    Returns:
      ``(d_lps, affine)``: ``(X, Y, Z, 3)`` float32 displacement in mm (LPS
      components, as stored) and the ``(4, 4)`` float64 voxel -> RAS affine
      of its grid.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if the file is unreadable, not 5D ``(X, Y, Z, 1, 3)`` (2D
        warps ``(X, Y, 1, 1, 2)`` are not supported), has another intent
        code, NaN/Inf values or a non-invertible affine.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:
        raise ValueError(f"{path}: cannot read as a NIfTI warp ({type(e).__name__}: {e})") from e
    if data.ndim != 5 or data.shape[3] != 1 or data.shape[4] != 3:
        hint = " (2D warps are not supported)" if data.ndim == 5 and data.shape[4] == 2 else ""
        raise ValueError(f"{path}: an ITK displacement field has shape (X, Y, Z, 1, 3), got {data.shape}{hint}")
    intent = int(img.header["intent_code"])
    if intent not in (NIFTI_INTENT_VECTOR, NIFTI_INTENT_DISPVECT):
        raise ValueError(f"{path}: intent_code is {intent}, expected {NIFTI_INTENT_VECTOR} (NIFTI_INTENT_VECTOR) "
                         f"or {NIFTI_INTENT_DISPVECT} (NIFTI_INTENT_DISPVECT)")
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{path}: warp contains {int((~np.isfinite(data)).sum())} NaN/Inf values")
    return data[:, :, :, 0, :], _check_affine(img.affine, str(path))


def apply_transform(image: Volume, transform, reference: Volume, *, order: int = 1) -> np.ndarray:
    """Resample an image onto a reference grid through a world-space ITK warp.

    Reference voxel ``r`` -> world ``p = A_ref r`` -> ``p + d(p)`` (warp
    evaluated as ITK does) -> image voxel ``y``; the output is the image at
    ``y`` with ITK's border rule: linear (``order=1``) or nearest
    (``order=0``, half rounds up) interpolation, edge values within half a
    voxel outside the image, 0 beyond. This is what ``antsApplyTransforms``
    computes with ``-n Linear`` / ``-n NearestNeighbor``.

    Args:
      image: :class:`Volume` to resample, ``data`` ``(X, Y, Z)`` (or ``(X, Y,
        Z, C)``).
      transform: path of a warp (:func:`load_itk_warp`) or a tuple
        ``(d_lps, warp_affine)``.
      reference: :class:`Volume` whose grid (``data.shape``, ``affine``) the
        output lives on.
      order: 1 for images, 0 for label maps.

    Returns:
      ``(*reference.data.shape[:3])`` (plus ``C``) numpy array: float32 for
      ``order=1``, the image dtype for ``order=0``.

    Raises:
      ValueError: for 2D images/references or bad shapes/``order``.
    """
    if order not in (0, 1):
        raise ValueError(f"apply_transform: order must be 0 or 1, got {order}")
    if np.ndim(image.data) not in (3, 4) or np.ndim(reference.data) not in (3, 4):
        raise ValueError(f"apply_transform: 3D image and reference required (2D is not supported), got "
                         f"{np.shape(image.data)} and {np.shape(reference.data)}")
    if isinstance(transform, (str, pathlib.Path)):
        d_lps, warp_affine = load_itk_warp(transform)
    else:
        d_lps, warp_affine = transform
    _, y = _warp_coords(d_lps, warp_affine, image.affine, np.shape(reference.data)[:3], reference.affine)
    data = np.asarray(image.data)
    if order == 1:
        data = data.astype(np.float32)
    return _itk_sample(data, y, order)
