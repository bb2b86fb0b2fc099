"""End-to-end registration of two scans in world space (what ``jaxreg register`` runs).

The fixed scan defines the output grid. Optimisation runs on a *working grid*
covering the fixed field of view at ``resolution`` mm (never finer than the
fixed scan), onto which both scans are resampled through their NIfTI affines
(so scans on different grids and orientations register correctly). The
resulting map is upsampled to the fixed grid and composed with the
fixed-to-moving grid matrix, so one voxel map ``y = G (x + d(x))`` from fixed
voxels to moving voxels carries the whole transform; the warped image is
resampled from the original moving scan in one interpolation.
"""
import concurrent.futures
import dataclasses
import functools
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage as ndi

from jaxreg import losses as L
from jaxreg import metrics as M
from jaxreg.io import Volume, grid_to_grid_matrix, resample_to_grid, voxel_disp_to_world
from jaxreg.optimize import DNS_CONFIG, InstanceConfig, normalize_intensity, register_instance, similarity_fn
from jaxreg.programs import (bucket_shape, crop_high, default_device, pad_high, pad_to_class, program,
                             to_device)
from jaxreg.optimize.instance import (LINEAR_TRANSFORMS, InstanceResult, _in_background, _prepare_stages,
                                      _resample_affine, apply_intensity_range, compose_affine_deformable,
                                      intensity_range)
from jaxreg.spatial import identity_grid, sample, voxel_spacing

# Affine-only MI registration used to pre-align training subjects (jaxreg.data.load_subjects) and the
# inputs of learned methods (register_volumes_learned), so both see the same kind of alignment.
# Three levels (16, 8 and 4 mm on a 2 mm grid): a pre-alignment for a network need not be sub-millimetre.
# affine_init "upright" (headers and centre of mass, no principal-axes rotations): with the rotation-robust
# starts, 3 of 7 IXI subjects pre-aligned to MNI152 at 4 mm came out turned by ~180 degrees (label Dice
# between subjects 0.007 instead of ~0.5); the networks are trained on upright heads.
PREALIGN_CONFIG = InstanceConfig(transform="affine", similarity="mi", levels=1, iterations=(1,),
                                 learning_rates=(1e-2,), smoothness=(0.0,), affine_iterations=(150, 100, 80),
                                 affine_levels=3, affine_finest_factor=2, affine_init="upright")

# io-deepsim: DeepSim's features (a pretrained extractor, --checkpoint) compared by cosine through the same
# learned-descriptor similarity as io-dns (InstanceConfig similarity "dns": the cosine of feature_fn's stacks)
METHODS = {"io-mind": "mind", "io-dns": "dns", "io-dns-random": "dns", "io-deepsim": "dns", "io-mi": "mi",
           "io-nmi": "nmi", "io-ngf": "ngf", "io-lncc": "lncc", "io-mse": "mse"}
DNS_WEIGHTS = "dns_brain"  # shipped in jaxreg/weights (configs/dns_brain.py)


def feature_fn_for(method: str, weights: str | None = None, *, checkpoint: str | None = None) -> Callable | None:
    """The learned descriptor function of a learned-feature io-* method, or None for the others.

    ``io-dns``: MASR-Net with ``weights`` (a ``.safetensors`` path with its
    ``.json`` beside it; default the shipped ``dns_brain``); ``io-dns-random``:
    the same architecture untrained (DNS Table 3's random-initialisation
    ablation; seed 0); ``io-deepsim``: the DeepSim extractor of the training
    run ``checkpoint`` (:func:`jaxreg.methods.deepsim.load_extractor`; no
    weights are shipped, so it is required). Its function carries
    ``resolution_mm``, the grid spacing the extractor was trained on.

    Raises:
      FileNotFoundError: a missing weights file or run directory.
      ValueError: weights of another method or of a mismatched architecture;
        ``weights`` or ``checkpoint`` given for a method that takes none;
        io-deepsim without a 3D ``checkpoint``.
    """
    if method == "io-deepsim":
        from jaxreg.methods import deepsim

        if weights is not None:
            raise ValueError("io-deepsim takes its extractor from --checkpoint, not --weights")
        if not checkpoint:
            raise ValueError("io-deepsim needs --checkpoint DIR: a DeepSim feature-extractor run "
                             "(configs/deepsim_features_*.py) or a deepsim run")
        extractor, resolution = deepsim.load_extractor(checkpoint)
        if extractor.ndim != 3:
            raise ValueError(f"{checkpoint} holds a {extractor.ndim}D extractor; registering volumes needs a 3D one")
        fn = deepsim.feature_fn(extractor)
        fn.resolution_mm = resolution
        return fn
    if checkpoint is not None:
        raise ValueError(f"--checkpoint is not used by {method}")
    if method not in ("io-dns", "io-dns-random"):
        if weights is not None:
            raise ValueError(f"--weights is only used with io-dns, not {method}")
        return None
    from jaxreg.methods import dns as dns_method  # imported only here: it brings flax (~0.4 s of start-up)

    if method == "io-dns-random":
        if weights is not None:
            raise ValueError("io-dns-random uses an untrained network; --weights does not apply")
        # Config() is the architecture of the shipped weights (configs/dns_brain.py; a test checks it)
        return dns_method.feature_fn(dns_method.init(jax.random.key(0), dns_method.Config()))
    from jaxreg.weights import load_model

    _, model, _ = load_model(weights or DNS_WEIGHTS, method="dns")
    if model.ndim != 3:
        raise ValueError(f"the DNS weights are for {model.ndim}D images; jaxreg register needs 3D weights")
    return dns_method.feature_fn(model)


AUTO_VOXELS = 80        # voxels across the median extent of the fixed field of view (auto_resolution)
AUTO_MAX_SPACING = 2.0  # mm: the coarsest automatic working grid (brains: 2 mm, as before)
# Rigid and affine registrations (instance.LINEAR_TRANSFORMS) get a grid twice as fine: at 1 mm on
# ms_native/patient01 jaxreg rigid comes to 0.21-0.22 mm (sessions) and 0.30-0.56 mm (T1/T2 -> FLAIR) of the
# reference transforms, against 0.23-0.29 and 0.34-0.59 mm at 2 mm, in 5-6 s per pair
# (benchmarks/results/rigid_reference_1mm.md).


def auto_resolution(shape, affine, transform: str = "svf") -> float:
    """The working-grid spacing (mm) ``jaxreg register`` uses by default.

    Deformable transforms (``svf``, ``disp``): the coarsest grid that still
    has ``AUTO_VOXELS`` (80) voxels across the median extent of the fixed
    field of view, at most ``AUTO_MAX_SPACING`` (2 mm). ``rigid`` and
    ``affine``: half that spacing (twice the voxels, at most 1 mm), since a
    12-parameter fit is cheap and its precision is set by the finest grid.
    Never finer than the fixed scan's finest spacing.

    Brains (median extents 180-240 mm in ../shared/data) get 2 mm (1 mm for
    rigid/affine); a 4 x 8 x 8 cm spinal-cord field of view gets 1 mm
    (80 mm / 80; 0.5 mm for rigid/affine).

    Args:
      shape: fixed spatial shape (3 axes); affine: ``(4, 4)`` fixed voxel-to-world matrix.
      transform: the registration's transform (``InstanceConfig.transform``).

    Returns:
      spacing in mm (float).
    """
    spacing = voxel_spacing(affine)[: len(shape)]
    extent = float(np.median(np.asarray(shape, np.float64) * spacing))
    auto = min(extent / AUTO_VOXELS, AUTO_MAX_SPACING)
    if transform in LINEAR_TRANSFORMS:
        auto = auto / 2.0
    return float(max(auto, float(np.min(spacing))))


def working_grid(shape, affine, resolution: float | str | None, transform: str = "svf"):
    """Grid over the same field of view as ``(shape, affine)`` with voxels of at least ``resolution`` mm.

    Voxel centres follow ``jax.image.resize`` (``x_fixed = (x_work + 0.5) r - 0.5``,
    ``r = shape / work_shape``), which :func:`jaxreg.spatial.resize_disp` assumes.

    Args:
      shape: fixed spatial shape (3 axes).
      affine: ``(4, 4)`` fixed voxel-to-world matrix.
      resolution: target spacing in mm, ``"auto"`` (:func:`auto_resolution`), or None to keep the
        fixed grid.
      transform: the registration's transform, for ``"auto"``.

    Returns:
      ``(work_shape, work_affine, r)`` with ``r`` the per-axis size ratio.
    """
    shape = tuple(int(s) for s in shape)
    spacing = voxel_spacing(affine)[: len(shape)]
    if isinstance(resolution, str):
        if resolution != "auto":
            raise ValueError(f"resolution must be a number of mm, 'auto' or None, got {resolution!r}")
        resolution = auto_resolution(shape, affine, transform)
    if resolution is None:
        return shape, np.asarray(affine, np.float64), np.ones(len(shape))
    target = np.maximum(spacing, float(resolution))
    work = tuple(max(8, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))
    r = np.asarray(shape, np.float64) / np.asarray(work, np.float64)
    s = np.eye(len(shape) + 1)
    s[: len(shape), : len(shape)] = np.diag(r)
    s[: len(shape), -1] = 0.5 * r - 0.5
    return work, np.asarray(affine, np.float64) @ s, r


def _map_coords(matrix, shape, disp=None):
    """``matrix @ (x + disp(x))`` on a grid, ``(*shape, 3)`` float32."""
    x = identity_grid(shape)
    if disp is not None:
        x = x + disp
    m = jnp.asarray(matrix, jnp.float32)
    d = len(shape)
    return x @ m[:d, :d].T + m[:d, d]


def antialias(vol: Volume, affine) -> Volume:
    """``vol`` Gaussian-smoothed for resampling onto a grid with voxel axes ``affine`` (unchanged if not coarser).

    The filter depends only on the target voxel size per source axis, so one smoothing serves every grid whose
    axes are signed permutations of ``affine``'s (the rotated cubes of :func:`keymorph_world_keypoints`).
    """
    g = grid_to_grid_matrix(affine, vol.affine)
    # Voxel size of the target grid measured in source voxels, per source axis.
    step = np.abs(g[:3, :3]).max(axis=1)
    sigma = np.where(step > 1.0, 0.4 * step, 0.0)
    return Volume(ndi.gaussian_filter(vol.data.astype(np.float32), sigma), vol.affine) if np.any(sigma > 0) else vol


def resample_smooth(vol: Volume, shape, affine, *, smooth: bool = True) -> jnp.ndarray:
    """Resample ``vol`` onto ``(shape, affine)`` (linear), with Gaussian anti-aliasing (:func:`antialias`) when
    downsampling unless ``smooth=False`` (``vol`` already smoothed)."""
    data = (antialias(vol, affine) if smooth else vol).data
    return to_device(resample_to_grid(data, vol.affine, shape, affine, order=1)[..., None], np.float32)


class Registration(NamedTuple):
    """Result of :func:`register_volumes` on the fixed grid.

    Attributes:
      warped: ``(*fixed)`` moving scan resampled onto the fixed grid.
      disp_fixed: ``(*fixed, 3)`` whole map in fixed voxel coordinates,
        ``x + disp_fixed(x)`` = where the moving content is (fixed voxels).
      voxel_map_disp: ``(*fixed, 3)`` ``y - x`` with ``y`` in *moving* voxels
        (what :func:`jaxreg.io.voxel_disp_to_world` takes).
      inverse_disp_fixed: inverse of the whole map in fixed voxels, or None.
      warp_lps: ``(*fixed, 3)`` ITK displacement (LPS mm).
      inverse_warp_lps: ITK displacement of the inverse, or None.
      moving_on_fixed: the moving scan resampled by the affines only (before).
      work: dict of working-grid arrays (fixed, moving, warped, total_disp).
      losses: per-level loss curves.
      runtime_s: wall time of the optimisation (incl. compilation).
      matrix: working-grid affine found by the affine stage.
    """

    warped: np.ndarray
    disp_fixed: np.ndarray
    voxel_map_disp: np.ndarray
    inverse_disp_fixed: np.ndarray | None
    warp_lps: np.ndarray
    inverse_warp_lps: np.ndarray | None
    moving_on_fixed: np.ndarray
    work: dict
    losses: tuple
    runtime_s: float
    matrix: np.ndarray


def config_for(method: str, *, transform: str = "svf", affine: bool = True, levels: int | None = None,
               iterations=None, **overrides) -> InstanceConfig:
    """An :class:`InstanceConfig` for a CLI method name (``io-mind``, ``io-mi``, ...).

    ``levels`` keeps the defaults' finest levels (or repeats the coarsest).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    base = DNS_CONFIG if METHODS[method] == "dns" else InstanceConfig()
    kw = dict(similarity=METHODS[method], transform=transform, affine=affine)
    if levels is not None:
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        n = base.levels

        def fit(seq):
            seq = tuple(seq)
            return seq[n - levels:] if levels <= n else (seq[0],) * (levels - n) + seq

        kw.update(levels=levels, iterations=fit(base.iterations), learning_rates=fit(base.learning_rates),
                  smoothness=fit(base.smoothness))
    if iterations is not None:
        kw["iterations"] = tuple(int(i) for i in iterations)
    kw.update(overrides)
    return dataclasses.replace(base, **kw)


def _working_grid_of(fixed: Volume, moving: Volume, resolution: float | None, transform: str = "svf"):
    """``(shape, affine)`` of the working grid of two 3D scans (ValueError if either is not 3D)."""
    for name, vol in (("fixed", fixed), ("moving", moving)):
        if vol.data.ndim != 3:
            raise ValueError(f"{name} must be a 3D scan, got shape {vol.data.shape}")
    work_shape, work_affine, _ = working_grid(fixed.data.shape, fixed.affine, resolution, transform)
    return work_shape, work_affine


def _working_images(fixed: Volume, moving: Volume, resolution: float | None, transform: str = "svf"):
    """``(shape, affine, fixed_w, moving_w)``: both 3D scans resampled onto the working grid (ValueError if not 3D)."""
    work_shape, work_affine = _working_grid_of(fixed, moving, resolution, transform)
    return (work_shape, work_affine, resample_smooth(fixed, work_shape, work_affine),
            resample_smooth(moving, work_shape, work_affine))


def field_of_view(vol: Volume, shape, affine) -> np.ndarray:
    """``(*shape)`` float32 NumPy mask of the grid ``(shape, affine)`` inside ``vol``'s field of view (1 inside, 0 out)."""
    g = grid_to_grid_matrix(affine, vol.affine)
    inside = np.ones(tuple(shape), bool)
    axes = [np.arange(n, dtype=np.float64) for n in shape]
    for k, n in enumerate(vol.data.shape[:3]):  # moving voxel coordinate k: separable over the grid's axes
        terms = [(g[k, a] * axes[a]).reshape([-1 if b == a else 1 for b in range(len(shape))])
                 for a in range(len(shape))]
        xk = functools.reduce(np.add, terms) + g[k, 3]
        inside &= (xk >= -0.5) & (xk <= n - 0.5)
    return inside.astype(np.float32)


def _geometry(fixed: Volume, moving: Volume, work_shape, work_affine) -> dict:
    """What the instance optimiser needs to know about the grids: voxel size (mm) and the moving field of view."""
    return {"spacing": voxel_spacing(work_affine)[:3], "moving_mask": field_of_view(moving, work_shape, work_affine)}


def register_volumes(fixed: Volume, moving: Volume, *, config: InstanceConfig, resolution: float | None = 2.0,
                     progress: Callable[[str], None] | None = None,
                     feature_fn: Callable | None = None, init=None, metrics: bool = False) -> Registration:
    """Register two 3D scans in world space (see module docstring).

    Args:
      fixed: fixed scan (defines the output grid).
      moving: moving scan, any grid/orientation.
      config: instance-optimisation options.
      resolution: working-grid spacing in mm, ``"auto"`` (:func:`auto_resolution` for
        ``config.transform``, the CLI default: 2 mm for deformable brains, 1 mm for rigid/affine) or
        None (the fixed grid itself).
      progress: optional callback for progress messages.
      feature_fn: learned descriptors for ``similarity="dns"`` (:func:`feature_fn_for`).
      init: optional ``(4, 4)`` world (mm) affine, fixed -> moving, that
        replaces the header / centre-of-mass initialisation of the affine
        stage (``--init keymorph``: :func:`keymorph_init`); it counts in
        ``runtime_s`` only if computed inside (it is not).
      metrics: the caller will call :func:`registration_metrics`: its
        program is compiled with the registration's, and its similarity
        before and after runs in a thread from the end of the registration
        (while the caller warps the labels).

    Returns:
      :class:`Registration`.

    Raises:
      ValueError: if either scan is not 3D.
    """
    work_shape, work_affine = _working_grid_of(fixed, moving, resolution, config.transform)
    # compiling starts before the scans are resampled (on many cores a new grid's compilations are the critical
    # path; on 2 cores, where the cold call is CPU-bound, this measured no change)
    _prepare_programs(fixed, moving, work_shape, config, metrics)
    fixed_w, moving_w = (resample_smooth(v, work_shape, work_affine) for v in (fixed, moving))

    t0 = time.perf_counter()
    init_matrix = None
    if init is not None:  # world fixed -> moving, as a working-grid voxel map (both images live on that grid)
        init_matrix = np.linalg.inv(work_affine) @ np.asarray(init, np.float64) @ work_affine
    res = register_instance(fixed_w, moving_w, config=config, progress=progress, feature_fn=feature_fn,
                            init_matrix=init_matrix, **_geometry(fixed, moving, work_shape, work_affine))
    jax.block_until_ready(res.total_disp)
    runtime = time.perf_counter() - t0
    reg = _finish(fixed, moving, fixed_w, moving_w, work_shape, work_affine, res, runtime)
    if metrics:
        reg.work["similarity_job"] = _start_similarity(config, reg.work)
    return reg


def register_volumes_learned(fixed: Volume, moving: Volume, *, module, model, lam: float | None = None,
                             resolution: float | None = 2.0, affine: bool = True,
                             progress: Callable[[str], None] | None = None) -> Registration:
    """Register two 3D scans in world space with a trained network (e.g. ``jaxreg register --method vxm``).

    The scans are resampled onto the working grid (fixed field of view,
    ``resolution`` mm), the moving scan is affinely pre-aligned by jaxreg's
    affine stage (MI, as the training data were), both are normalised to
    [0, 1] (0.5-99.5 percentiles, ``normalize_intensity``, as the training data were) and
    zero-padded to sizes divisible by ``2 ** levels``; one forward pass of
    ``module.register`` gives the deformable part, which is composed with the
    affine and handled exactly as :func:`register_volumes`' result.

    Args:
      fixed, moving: 3D scans (any grids/orientations).
      module, model: from :func:`jaxreg.methods.restore_model`.
      lam: regularisation weight of a lambda-conditioned model.
      resolution: working-grid spacing (mm): use the training resolution.
      affine: run the affine pre-alignment.

    Returns:
      :class:`Registration` (``runtime_s`` = affine stage + network).

    Raises:
      ValueError: non-3D scans, or ``lam`` inconsistent with the model.
    """
    report = progress or (lambda _: None)
    work_shape, work_affine, fixed_w, moving_w = _working_images(fixed, moving, resolution)
    t0 = time.perf_counter()
    d = len(work_shape)
    matrix = np.eye(d + 1)
    if affine:
        matrix = np.asarray(register_instance(fixed_w, moving_w, config=PREALIGN_CONFIG,
                                              **_geometry(fixed, moving, work_shape, work_affine)).matrix, np.float64)
        report("affine pre-alignment done")
    moving_aff = _resample_affine(moving_w, to_device(matrix, np.float32), padding="zeros")
    f, m = normalize_intensity(fixed_w), normalize_intensity(moving_aff)
    mult = 2 ** len(model.config.enc_features)
    padded = tuple(int(np.ceil(s / mult) * mult) for s in work_shape)
    before = [(p - s) // 2 for p, s in zip(padded, work_shape)]
    pad = [(b, p - s - b) for b, p, s in zip(before, padded, work_shape)] + [(0, 0)]
    out = module.register(model, jnp.pad(f, pad), jnp.pad(m, pad), lam=lam)
    crop = tuple(slice(b, b + s) for b, s in zip(before, work_shape))
    u = out.disp[crop]
    total, inverse = compose_affine_deformable(matrix, u, out.inverse_disp[crop])
    jax.block_until_ready(total)
    runtime = time.perf_counter() - t0
    report(f"network forward done ({runtime:.1f} s with the affine stage)")
    res = InstanceResult(matrix, u, total, inverse, out.velocity[crop], ())
    return _finish(fixed, moving, fixed_w, moving_w, work_shape, work_affine, res, runtime)


KEYMORPH_WEIGHTS = "keymorph_brain"


def load_keymorph(weights: str | None = None):
    """The KeyMorph detector from ``weights`` (a ``.safetensors`` path; default the shipped ``keymorph_brain``).

    Raises:
      FileNotFoundError: a missing weights file; ValueError: weights of another method or not 3D.
    """
    from jaxreg.weights import load_model

    _, model, _ = load_model(weights or KEYMORPH_WEIGHTS, method="keymorph")
    if model.ndim != 3:
        raise ValueError(f"the KeyMorph weights are for {model.ndim}D images; jaxreg register needs 3D weights")
    return model


def keymorph_world_keypoints(vol: Volume, model, *, rotation_average: bool = True) -> np.ndarray:
    """KeyMorph keypoints of one 3D scan in world mm: ``(N, 3)`` float64 (NIfTI RAS).

    The scan goes onto its input cube (:func:`jaxreg.methods.keymorph.canonical_grid`) and the detector
    gives ``(N, 3)`` cube voxels, mapped to world mm. ``rotation_average`` (ours, not in the paper): the
    cube is also turned by each of the 23 other rotations of the cube about its centre
    (:func:`jaxreg.methods.keymorph.cube_rotations`) and the 24 world keypoint sets are averaged point by
    point, which makes the result invariant to those rotations of the scan. The CPU-scale detector is far
    from rotation-equivariant on its own; on the held-out IXI pairs rotated by 45-180 degrees the average
    cut the keypoint repeatability from 5.4-8.9 mm to 1.3-2.7 mm (benchmarks/results/keymorph_rotation.md).
    It costs one anti-aliasing filter and 24 detector passes on 32^3 (~0.27 s per IXI scan on 2 CPU cores).

    Raises:
      ValueError: a scan that is not 3D.
    """
    from jaxreg.data.keymorph import to_cube
    from jaxreg.methods import keymorph as km

    if vol.data.ndim != 3:
        raise ValueError(f"KeyMorph needs 3D scans, got shape {vol.data.shape}")
    cfg = model.config
    cube = km.canonical_grid(vol.data, vol.affine, grid=cfg.grid, spacing=cfg.spacing)
    half = (np.asarray(cfg.grid, np.float64) - 1) / 2
    centre = cube[:3, :3] @ half + cube[:3, 3]
    rotations = km.cube_rotations(3) if rotation_average else np.eye(3)[None]
    smoothed = antialias(vol, cube)  # the same filter for every turned cube: smooth once
    total = np.zeros((cfg.num_keypoints, 3))
    for r in rotations:
        turned = np.eye(4)
        turned[:3, :3] = r @ cube[:3, :3]
        turned[:3, 3] = centre - turned[:3, :3] @ half
        kp = np.asarray(km.keypoints(model, to_cube(smoothed, turned, cfg.grid, smooth=False)[..., None]), np.float64)
        total += kp @ turned[:3, :3].T + turned[:3, 3]
    return total / len(rotations)


KEYPOINT_LINE_RATIO = 0.25  # second / first principal spread below which keypoints count as a line


def keypoints_near_line(points: dict) -> dict:
    """``{"fixed" | "moving": (D,) principal RMS spread in mm}`` of the scans whose keypoints lie near a line.

    Rotation-averaged KeyMorph keypoints on brains have one near-zero axis (the mid-sagittal plane); a second
    small one (:data:`KEYPOINT_LINE_RATIO`) leaves even the rigid fit undetermined. ``points``: a
    :func:`keymorph_points` result.
    """
    from jaxreg.methods.keymorph import principal_spread

    out = {}
    for name in ("fixed", "moving"):
        spread = np.asarray(principal_spread(points[f"{name}_keypoints"]), np.float64)
        if spread[1] < KEYPOINT_LINE_RATIO * spread[0]:
            out[name] = spread
    return out


def keymorph_points(fixed: Volume, moving: Volume, model, *, transform: str = "affine",
                    tps_lambda: float = 0.0, rotation_average: bool | None = None,
                    affine_ridge: float | None = None) -> dict:
    """KeyMorph on two scans in world space: keypoints (world mm, NIfTI RAS) and the fitted map.

    Each scan's keypoints come from :func:`keymorph_world_keypoints` (its own input cube;
    ``rotation_average``, default on for ``"affine"`` and ``"rigid"`` and off for ``"tps"``: averaged over
    the 24 rotations of the cube), and the map is fitted between the keypoints in world mm (fixed ->
    moving: the pull-back). ``"affine"``: eq. 3's least squares with a ridge of ``affine_ridge`` (default
    :data:`jaxreg.methods.keymorph.AFFINE_RIDGE`; 0 = eq. 3 as published) towards the keypoints' rigid
    fit (:func:`jaxreg.spatial.fit_affine`): our detector's averaged keypoints lie near one plane, across
    which eq. 3 alone is undetermined. ``"rigid"``: the least-squares rotation + translation
    (:func:`jaxreg.spatial.fit_rigid`). ``"tps"``: eqs. 7-9 on single-cube keypoints (a TPS's affine part
    has no ridge; :func:`jaxreg.spatial.tps_solve` normalises the control points).

    Returns:
      dict with ``fixed_keypoints``, ``moving_keypoints`` (``(N, 3)`` float64 world mm) and ``fitted``
      (:func:`jaxreg.methods.keymorph.fit_points` in world mm; for affine and rigid a ``(4, 4)`` float64
      matrix).

    Raises:
      ValueError: bad ``transform`` / ``tps_lambda`` / ``affine_ridge`` or non-3D scans.
    """
    from jaxreg.methods import keymorph as km
    from jaxreg.spatial import fit_affine, fit_rigid

    if transform not in km.REGISTER_TRANSFORMS:
        raise ValueError(f"transform must be one of {km.REGISTER_TRANSFORMS}, got {transform!r}")
    lam = km.check_lambda(tps_lambda)
    ridge = km.AFFINE_RIDGE if affine_ridge is None else float(affine_ridge)
    if not np.isfinite(ridge) or ridge < 0:
        raise ValueError(f"affine_ridge must be finite and >= 0, got {affine_ridge}")
    if rotation_average is None:
        rotation_average = transform != "tps"
    pts = [keymorph_world_keypoints(vol, model, rotation_average=rotation_average) for vol in (fixed, moving)]
    src, dst = (jnp.asarray(p, jnp.float32) for p in pts)  # both fits centre the points: float32 suffices
    if transform == "tps":
        fitted = km.fit_points(src, dst, transform="tps", tps_lambda=lam)
    else:
        rigid = fit_rigid(src, dst)
        if transform == "affine":
            rigid = fit_affine(src, dst, ridge=ridge, prior=rigid[:3, :3])
        fitted = ("affine", np.asarray(rigid, np.float64))
    return {"fixed_keypoints": pts[0], "moving_keypoints": pts[1], "fitted": fitted}


def keymorph_init(fixed: Volume, moving: Volume, model, *, progress: Callable[[str], None] | None = None,
                  points: dict | None = None):
    """KeyMorph's rigid world map (fixed -> moving) as the start of an io-* affine stage, or None.

    The least-squares rotation + translation of the two scans' rotation-averaged keypoints
    (:func:`keymorph_points` with ``transform="rigid"``); the affine stage then frees scale and shear
    from the images. The rigid fit is well posed even where the keypoints lie near one plane (ours:
    eq. 3's affine start was ill posed for our detector's keypoints, benchmarks/results/keymorph_rotation.md).
    None (use the default initialisation) when the fit is not finite or either scan's keypoints lie near a
    line (:data:`KEYPOINT_LINE_RATIO`; then even the rotation is undetermined: measured on the skull-stripped
    brats scans, 10 / 1.8 / 0.2 mm). ``points``: a :func:`keymorph_points` result already computed for this
    pair (only its keypoints are used).
    """
    from jaxreg.spatial import fit_rigid

    report = progress or (lambda _: None)
    if points is None:
        points = keymorph_points(fixed, moving, model, transform="rigid")
        start = points["fitted"][1]
    else:
        start = fit_rigid(*(jnp.asarray(points[k], jnp.float32) for k in ("fixed_keypoints", "moving_keypoints")))
    start = np.asarray(start, np.float64)
    if not np.isfinite(start).all():
        report("KeyMorph rigid fit is not finite: using the default initialisation")
        return None
    for name in keypoints_near_line(points):
        report(f"KeyMorph keypoints of the {name} scan lie near a line: using the default initialisation")
        return None
    report("KeyMorph rigid initialisation")
    return start


def register_volumes_keymorph(fixed: Volume, moving: Volume, *, model, transform: str = "affine",
                              tps_lambda: float = 0.0, resolution: float | None = 2.0,
                              progress: Callable[[str], None] | None = None, rotation_average: bool | None = None,
                              affine_ridge: float | None = None) -> tuple[Registration, dict]:
    """``jaxreg register --method keymorph``: the KeyMorph map on the working grid, as any other result.

    Returns:
      ``(Registration, keypoints)`` with ``keypoints`` from :func:`keymorph_points`. The TPS result has
      no inverse warp (None); the affine one has its exact inverse.

    Raises:
      ValueError: bad ``transform`` / ``tps_lambda`` or non-3D scans.
    """
    from jaxreg.methods.keymorph import map_points
    from jaxreg.spatial import affine_to_disp

    report = progress or (lambda _: None)
    work_shape, work_affine, fixed_w, moving_w = _working_images(fixed, moving, resolution)
    t0 = time.perf_counter()
    pts = keymorph_points(fixed, moving, model, transform=transform, tps_lambda=tps_lambda,
                          rotation_average=rotation_average, affine_ridge=affine_ridge)
    for name, spread in keypoints_near_line(pts).items():
        report(f"warning: the {name} scan's KeyMorph keypoints lie near a line (RMS spread "
               + " / ".join(f"{v:.1f}" for v in spread) + " mm): the fit is unreliable; the detector was "
               "trained on brain MRI with skull (IXI)")
    w, w_inv = np.asarray(work_affine, np.float64), np.linalg.inv(work_affine)
    zero = jnp.zeros(tuple(work_shape) + (3,), jnp.float32)
    if pts["fitted"][0] == "affine":
        matrix = w_inv @ pts["fitted"][1] @ w
        total = affine_to_disp(to_device(matrix, np.float32), tuple(work_shape))
        inverse = affine_to_disp(to_device(np.linalg.inv(matrix), np.float32), tuple(work_shape))
    else:
        matrix = np.eye(4)
        grid = identity_grid(tuple(work_shape)).reshape(-1, 3)
        world = grid @ jnp.asarray(w[:3, :3].T, jnp.float32) + jnp.asarray(w[:3, 3], jnp.float32)
        moved = map_points(pts["fitted"], world, chunk=65536)
        total = ((moved @ jnp.asarray(w_inv[:3, :3].T, jnp.float32) + jnp.asarray(w_inv[:3, 3], jnp.float32))
                 - grid).reshape(tuple(work_shape) + (3,))
        inverse = None
    jax.block_until_ready(total)
    runtime = time.perf_counter() - t0
    report(f"keymorph {transform} done ({runtime:.1f} s)")
    res = InstanceResult(matrix, zero, total, inverse, None, ())
    return _finish(fixed, moving, fixed_w, moving_w, work_shape, work_affine, res, runtime), pts


@program(static_argnames=("shape",), quick=True)
def _upsample_disp(disp, ratio, *, shape):
    """A working-grid displacement (voxels) on a finer grid of the same field of view (voxels).

    ``ratio``: ``(D,)`` float32, true fine / true working shape (>= 1 but on axes of fewer than 8 voxels); the
    fine grid's voxel ``x`` lies at working voxel ``(x + 0.5) / ratio - 0.5`` (:func:`working_grid`), read
    by linear interpolation (``jax.image.scale_and_translate``) and the vectors scale by ``ratio``. This is
    :func:`jaxreg.spatial.resize_disp` with the ratio as an argument, so both grids may be padded to their size
    classes (``disp`` edge-padded, so the border values are held as without padding; ``shape`` the padded fine
    grid): one program per class (issue 18).
    """
    d = disp.shape[-1]
    # separable weights per axis, as jax.image.resize (3x faster at 1 mm than a trilinear gather per voxel)
    out = jax.image.scale_and_translate(disp, tuple(shape) + (d,), tuple(range(d)), ratio, jnp.zeros_like(ratio),
                                        method="linear", antialias=True)
    return out * ratio


def _prepare_programs(fixed: Volume, moving: Volume, work_shape, config: InstanceConfig, metrics: bool) -> None:
    """Compile, in the background while the scans are resampled and the affine stage runs, the programs that
    :func:`register_instance` and :func:`_finish` (and :func:`registration_metrics` if ``metrics``) will call
    on these grids (:func:`jaxreg.programs._prepare`, in the order they are called; issue 18)."""
    class_f, class_w = bucket_shape(fixed.data.shape), bucket_shape(work_shape)
    f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
    channels = 1  # resample_smooth's working images: (*work_shape, 1)
    _prepare_stages(config, work_shape, channels, mask=False, moving_mask=True)  # _geometry gives a moving mask
    _to_fixed_grid.prepare(f32(class_w + (3,)), f32((3,)), f32((4, 4)), f32(bucket_shape(moving.data.shape)),
                           f32(class_w + (channels,)), shape_f=class_f,
                           same_grid=tuple(fixed.data.shape) == tuple(work_shape))
    if metrics:
        _field_regularity.prepare(f32(class_f + (3,)), jax.ShapeDtypeStruct((3,), jnp.int32))
        if config.similarity != "dns":
            images = (f32(class_w + (channels,)),) * 3  # fixed, moving, warped
            _similarity_losses.prepare(images, ((f32((1, 1, 1, channels)),) * 2,) * 3,
                                       jax.ShapeDtypeStruct((3,), jnp.int32), config=config)


@program(static_argnames=("shape_f", "same_grid"), quick=True)
def _to_fixed_grid(total_disp, ratio, g, moving_data, moving_w, *, shape_f, same_grid):
    """Working-grid map -> fixed grid: (disp_fixed, voxel map to moving voxels, warped, moving by the
    grid matrix only, warped on the working grid), one compiled call (eager ops took ~8 s at 1 mm).

    Every array is padded at its high end to its size class and ``shape_f`` is the fixed grid's class (the
    caller crops the outputs): ``total_disp`` edge-padded (``ratio`` as :func:`_upsample_disp`), the images
    zero-padded, which sampling reads outside them anyway. Exact on the true grids; a new scan of a known
    class compiles nothing (issue 18). ``same_grid``: the working grid is the fixed grid (``ratio`` 1), whose
    map needs no resampling (0.1 s of a 2 mm brain's call).
    """
    disp_fixed = total_disp if same_grid else _upsample_disp(total_disp, ratio, shape=shape_f)
    coords = _map_coords(g, shape_f, disp_fixed)
    warped = sample(moving_data[..., None], coords)[..., 0]
    moving_on_fixed = sample(moving_data[..., None], _map_coords(g, shape_f))[..., 0]
    warped_w = sample(moving_w, identity_grid(moving_w.shape[:-1]) + total_disp)
    return disp_fixed, coords - identity_grid(shape_f), warped, moving_on_fixed, warped_w


def _finish(fixed, moving, fixed_w, moving_w, work_shape, work_affine, res, runtime) -> Registration:
    """Bring a working-grid result to the fixed grid (warped image, maps, ITK warps)."""
    shape_f, shape_w = tuple(fixed.data.shape), tuple(work_shape)
    class_f, class_w = bucket_shape(shape_f), bucket_shape(shape_w)
    ratio = to_device(np.asarray(shape_f, np.float32) / np.asarray(shape_w, np.float32))
    g = grid_to_grid_matrix(fixed.affine, moving.affine)
    outs = _to_fixed_grid(
        to_device(pad_high(res.total_disp, class_w, "edge")), ratio, to_device(g, np.float32),
        to_device(pad_to_class(moving.data), np.float32),
        to_device(pad_high(moving_w, class_w)), shape_f=class_f, same_grid=shape_f == shape_w)
    disp_class = outs[0]  # kept on the device, padded, for the labels and the field's regularity
    disp_fixed, voxel_map, warped, moving_on_fixed = (crop_high(x, shape_f) for x in outs[:4])
    warped_w = crop_high(outs[4], shape_w)
    # world warps of the padded (contiguous) maps, then cropped: a crop's reshape copied 0.1 s per 1 mm field
    warp_lps = crop_high(voxel_disp_to_world(np.asarray(outs[1]), fixed.affine, moving.affine), shape_f)
    inverse_fixed = inverse_lps = None
    if res.inverse_disp is not None:
        inverse_class = res.inverse_disp if shape_f == shape_w else _upsample_disp(
            to_device(pad_high(res.inverse_disp, class_w, "edge")), ratio, shape=class_f)
        inverse_fixed = crop_high(inverse_class, shape_f)
        inverse_lps = crop_high(voxel_disp_to_world(np.asarray(inverse_class), fixed.affine, fixed.affine), shape_f)
    work = {"fixed": fixed_w, "moving": moving_w, "warped": warped_w, "total_disp": res.total_disp,
            "shape": work_shape, "affine": work_affine, "disp_fixed_class": disp_class}
    return Registration(warped, disp_fixed, voxel_map, inverse_fixed, warp_lps, inverse_lps, moving_on_fixed, work,
                        res.losses, runtime, res.matrix)


def _disp_fixed_class(reg: "Registration", class_f) -> jax.Array:
    """The registration's fixed-grid displacement padded to the fixed grid's size class, on the device."""
    disp = reg.work.get("disp_fixed_class")  # made by _finish; a Registration built elsewhere is padded here
    if disp is None or tuple(disp.shape[:-1]) != tuple(class_f):
        disp = to_device(pad_high(reg.disp_fixed, class_f, "edge"), np.float32)
    return disp


def warp_labels_to_fixed(labels: Volume, fixed: Volume, reg: Registration | None) -> np.ndarray:
    """Moving labels resampled (nearest neighbour) onto the fixed grid by the registration (None: by the headers only)."""
    shape_f = tuple(fixed.data.shape)
    class_f = bucket_shape(shape_f)
    g = to_device(grid_to_grid_matrix(fixed.affine, labels.affine), np.float32)
    # by the headers alone: a zero displacement (exact), so both calls of a registration share one program
    disp = to_device(np.zeros(class_f + (3,), np.float32)) if reg is None else _disp_fixed_class(reg, class_f)
    data = to_device(pad_to_class(labels.data), np.int32)
    return np.ascontiguousarray(crop_high(_warp_labels(data, g, disp, shape=class_f), shape_f))


@program(static_argnames=("shape",), quick=True)
def _warp_labels(labels, g, disp, *, shape):
    """Nearest-neighbour labels on the grid ``shape``; the labels, the grid and ``disp`` may be padded to their
    size classes (zeros outside the labels either way; the caller crops)."""
    return sample(labels, _map_coords(g, shape, disp), order=0)


def similarity_value(config: InstanceConfig, fixed_w, moving_w, feature_fn: Callable | None = None) -> float:
    """The method's similarity loss (lower is better) on the working grid (MIND and DNS descriptors unsmoothed)."""
    return _similarities(config, fixed_w, (moving_w,), feature_fn)[0]


def _similarity_before_after(config: InstanceConfig, work: dict, feature_fn) -> dict:
    """``similarity_before`` / ``similarity_after`` on the working grid."""
    before, after = _similarities(config, work["fixed"], (work["moving"], work["warped"]), feature_fn)
    return {"similarity_before": before, "similarity_after": after}


def _similarities(config: InstanceConfig, fixed_w, others, feature_fn) -> list[float]:
    """The similarity loss of ``fixed_w`` against each image of ``others``, all normalised as
    :func:`normalize_intensity` does; the fixed image's descriptors (MIND-SSC or learned) are computed once."""
    if config.similarity == "dns":
        from jaxreg.optimize.instance import _box_features

        fd, *descs = _box_features(feature_fn, *(normalize_intensity(x) for x in (fixed_w, *others)))
        return [float(L.cosine_similarity_loss(fd, x)) for x in descs]
    args = _similarity_arguments(fixed_w, *others)
    # prepared by register_volumes(metrics=True); otherwise compiled here, after the programs queued before it
    _similarity_losses.prepare(*args, config=config)
    return [float(v) for v in _similarity_losses(*args, config=config)]


def _similarity_arguments(*images) -> tuple:
    """:func:`_similarity_losses`' arguments for working-grid images: each edge-padded to its size class, with its
    :func:`intensity_range` (the percentiles on the host; the mapping to [0, 1] runs in the program: on the host
    it took ~0.2 s of the IXI pair's metrics, issue 18) and the true grid shape."""
    shape = tuple(np.shape(images[0])[:-1])
    return (tuple(to_device(pad_high(x, bucket_shape(shape), "edge"), np.float32) for x in images),
            tuple(tuple(to_device(v) for v in intensity_range(x)) for x in images),
            to_device(np.asarray(shape, np.int32)))


def _start_similarity(config: InstanceConfig, work: dict, feature_fn: Callable | None = None,
                      device=None) -> "concurrent.futures.Future | None":
    """:func:`_similarity_before_after` of a registration's working-grid images in a thread on ``device`` (default:
    JAX's), so it runs while the caller warps the labels and writes the outputs (issue 18); None for learned
    descriptors without their ``feature_fn``."""
    if config.similarity == "dns" and feature_fn is None:
        return None
    return _in_background(lambda: _similarity_before_after(config, work, feature_fn), device or default_device())


def _inside(shape, true_shape):
    """``(*shape)`` bool: the voxels of the leading ``true_shape`` (traced ``(D,)`` int32) of a padded grid."""
    return functools.reduce(jnp.logical_and, [jax.lax.broadcasted_iota(jnp.int32, shape, k) < true_shape[k]
                                              for k in range(len(shape))])


def _similarity_descriptors(x, lo, hi, inside, config):
    """``x`` mapped to [0, 1] by ``(lo, hi)`` (:func:`intensity_range`), then MIND-SSC for ``"mind"`` (variance
    normalised over the ``inside`` voxels only) or the image itself."""
    x = apply_intensity_range(x, lo, hi)
    if config.similarity == "mind":
        return L.mind_ssc(x, radius=config.mind_radius, dilation=config.mind_dilation, mask=inside)
    return x


@program(static_argnames=("config",), quick=True)
def _similarity_losses(images, ranges, true_shape, *, config):
    """The similarity loss of each of ``images[1:]`` against ``images[0]`` (a tuple of scalars), each image first
    mapped to [0, 1] by its ``(lo, hi)`` in ``ranges`` (:func:`intensity_range`).

    One program and one call for all images: the fixed image's descriptors are computed once and each other
    image's are dropped after its loss (IXI pair, 128x128x96 class: one call's buffers instead of three calls'
    ~230 MB each, which a cold call paid in fresh pages; issue 18). The images are edge-padded at their high end
    to the grid's size class and only the leading ``true_shape`` voxels count (also in MIND-SSC's variance
    normalisation), so one program serves a size class. The value equals the unpadded one but for voxels within
    the descriptor's reach of the high-end faces. Compiled as a ``quick`` program.
    """
    inside = _inside(images[0].shape[:-1], true_shape)
    fd = _similarity_descriptors(images[0], *ranges[0], inside, config)
    others = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *zip(images[1:], ranges[1:]))
    # one image at a time (a loop reuses its buffers): unrolled, XLA kept every image's descriptors at once
    losses = jax.lax.map(lambda xr: similarity_fn(config)(fd, _similarity_descriptors(xr[0], *xr[1], inside, config),
                                                          inside), others)
    return tuple(losses)


@program(quick=True)
def _field_regularity(disp, true_shape):
    """``(folding_percent, sdlogj)`` of the leading ``true_shape`` (``(D,)`` int32) voxels of a displacement
    field that may be padded at its high end (to its size class: one program per class, issue 18).

    The value just past each high-end border is replaced by the linear extrapolation ``2 u[n-1] - u[n-2]``, so
    the Jacobian's central difference at the last voxel equals the one-sided difference of the unpadded field:
    the result is that of the unpadded field (to rounding).
    """
    for k in range(disp.ndim - 1):
        n = true_shape[k]
        last = jax.lax.dynamic_index_in_dim(disp, n - 1, axis=k, keepdims=True)
        prev = jax.lax.dynamic_index_in_dim(disp, n - 2, axis=k, keepdims=True)
        disp = jnp.where(jax.lax.broadcasted_iota(jnp.int32, disp.shape, k) == n, 2.0 * last - prev, disp)
    inside = _inside(disp.shape[:-1], true_shape)
    return M.folding_percent(disp, mask=inside), M.sdlogj(disp, mask=inside)


def start_label_metrics(fixed: Volume, fixed_labels: Volume | None,
                        moving_labels: Volume | None) -> "concurrent.futures.Future | None":
    """What the label metrics need that does not depend on the registration, computed in a thread while it runs
    (None without both label maps): ``{"moving_labels_on_fixed"``: the moving labels on the fixed grid by the
    headers alone (:func:`warp_labels_to_fixed`), ``"fixed_surfaces"``: the fixed labels' HD95 surfaces and
    k-d trees (:func:`jaxreg.metrics.label_surfaces`)``}``, for :func:`registration_metrics` (issue 18: this
    was ~0.15 s after the IXI pair's registration)."""
    if fixed_labels is None or moving_labels is None:
        return None
    def prepare():
        values = np.union1d(np.unique(fixed_labels.data), np.unique(moving_labels.data))
        return {"moving_labels_on_fixed": warp_labels_to_fixed(moving_labels, fixed, None),
                "fixed_surfaces": M.label_surfaces(fixed_labels.data, [int(v) for v in values if v != 0],
                                                   spacing=voxel_spacing(fixed.affine))}

    return _in_background(prepare, default_device())


def registration_metrics(method: str, config: InstanceConfig, reg: Registration, fixed: Volume,
                         fixed_labels: Volume | None = None, warped_labels: np.ndarray | None = None,
                         moving_labels_on_fixed: np.ndarray | None = None,
                         feature_fn: Callable | None = None, fixed_surfaces: M.LabelSurfaces | None = None) -> dict:
    """The ``metrics.json`` dictionary (see README) for a registration (``fixed_surfaces``: the fixed labels'
    :func:`jaxreg.metrics.label_surfaces`, from :func:`start_label_metrics`)."""
    shape_f = tuple(np.shape(reg.disp_fixed)[:-1])
    disp = _disp_fixed_class(reg, bucket_shape(shape_f))
    # the similarity's descriptors run on the device (a thread waits for them) while the host scores the labels:
    # 0.3 s of the IXI pair's ~0.6 s of metrics overlap on 2 CPU cores (issue 18); register_volumes(metrics=True)
    # started it at the end of the registration
    similarity = reg.work.get("similarity_job") or _start_similarity(config, reg.work, feature_fn,
                                                                     next(iter(disp.devices())))
    out = {
        "method": method,
        "transform": config.transform,
        "runtime_s": round(reg.runtime_s, 3),
        "similarity": f"{'deepsim' if method == 'io-deepsim' else config.similarity} loss (lower is better)",
        "similarity_before": None, "similarity_after": None,
        **{k: float(v) for k, v in zip(("folding_percent", "sdlogj"),
                                        _field_regularity(disp, to_device(np.asarray(shape_f, np.int32))))},
        "working_grid": list(reg.work["shape"]),
    }
    try:
        out.update(_label_metrics(fixed, fixed_labels, warped_labels, moving_labels_on_fixed, fixed_surfaces))
    finally:
        out.update(similarity.result())  # also waits for the thread when the label metrics failed
    return out


def _label_metrics(fixed: Volume, fixed_labels: Volume | None, warped_labels: np.ndarray | None,
                   moving_labels_on_fixed: np.ndarray | None, fixed_surfaces=None) -> dict:
    """Dice, Dice30 and HD95 of the warped labels (and Dice before, by the headers alone), or {} without labels."""
    out = {}
    if fixed_labels is not None and warped_labels is not None:
        labels = np.unique(np.concatenate([np.unique(fixed_labels.data), np.unique(warped_labels)]))
        labels = [int(v) for v in labels if v != 0]
        per = M.dice(warped_labels, fixed_labels.data, labels=labels)
        hd = M.hd95(warped_labels, fixed_labels.data, spacing=voxel_spacing(fixed.affine), labels=labels,
                    target_surfaces=fixed_surfaces)
        out["dice"] = {str(k): float(v) for k, v in zip(labels, per)}
        out["dice_mean"] = float(np.nanmean(per))
        out["dice30"] = float(M.dice30(per))
        out["hd95_mm"] = float(np.nanmean(hd))
        if moving_labels_on_fixed is not None:
            out["dice_mean_before"] = float(np.nanmean(M.dice(moving_labels_on_fixed, fixed_labels.data,
                                                              labels=labels)))
    return out
