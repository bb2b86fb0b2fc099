"""KeyMorph: learned keypoints aligned in closed form (affine least squares or a thin-plate spline).

``Config``, ``init``, ``loss_fn`` (self-supervised pretraining, supervised
soft Dice, unsupervised MSE and multi-contrast keypoint consistency, with the
paper's random affine augmentation), ``keypoints``, ``register`` and
``validate``; :func:`canonical_grid` is the network's input grid.

The input grid. A scan enters the network resampled onto a cube of
``grid`` voxels of ``spacing`` mm (defaults 32^3 at 8 mm = 256 mm, the
field of view of the paper's 256^3 at 1 mm, Sec. 5.1) whose axes are the world (RAS) axes and
whose centre is the scan's intensity centroid (foreground above 5 % of the
0.5-99.5 percentile range). Nothing about the scan's own voxel grid or
orientation survives this step, so a head rotated in its header is a rotated
head to the network: robustness to rotation has to come from the keypoints
(Sec. 3: "robustness to large misalignments is achieved if the CNN is
equivariant"), which is what the +-180 degree augmentation trains.
Keypoints are ``(N, 3)`` in voxel coordinates of that grid; its affine maps
them to world mm.

Transforms (Sec. 3.1-3.2). The keypoints of the fixed image ``P_f`` and of
the moving image ``P_m`` define a map from fixed to moving coordinates (the
pull-back used to resample the moving image, footnote 2): the weighted
least-squares affine of eq. (3) (:func:`jaxreg.spatial.fit_affine`) or the
thin-plate spline of eqs. (4)-(9) with regulariser ``lambda``
(:func:`jaxreg.spatial.tps_solve`; ``lambda`` acts in the TPS module's
normalised coordinates, see its docstring).

References:
  Wang, Yu, Dalca, Sabuncu, "A robust and interpretable deep learning
  framework for multi-modal registration via keypoints", Medical Image
  Analysis 2023: Sec. 3 (eqs. 1-10), Sec. 4.1 (detector, centre-of-mass
  layer), Sec. 4.2 (supervised soft Dice; unsupervised MSE alternating with
  the keypoint loss of eq. 11), Sec. 4.3 (self-supervised pretraining,
  eq. 12), Sec. 5.3 (N = 128, batch 1, Adam, augmentation: rotations
  +-180 degrees, translations +-15 voxels, scale [0.8, 1.2], shear
  [-0.1, 0.1]; KM-LogUnif: lambda ~ LogUnif(0, 10)).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreg.augment.deform import random_deformation
from jaxreg.augment.spatial import random_affine_matrix
from jaxreg.nn.keypoints import KeypointDetector
from jaxreg.spatial import fit_affine, fit_rigid, sample, tps_solve, tps_transform
from jaxreg.spatial.grid import identity_grid

TRANSFORMS = ("affine", "tps", "logunif")  # training (Config.transform)
REGISTER_TRANSFORMS = ("affine", "rigid", "tps")  # test time (register, jaxreg register --method keymorph)
# Ridge of the world-space KeyMorph affine towards the keypoints' rigid fit (jaxreg.spatial.fit_affine; ours):
# the affine takes the rigid fit's columns along directions in which the fixed keypoints spread less than
# ~13 % of their RMS radius. On the held-out IXI pairs (rotation-averaged keypoints) 0.05 gave Dice 0.28
# at 0 degrees and 0.25-0.29 at 45-180 (0.01: 0.27 / 0.23-0.30; eq. 3 alone: 0.01-0.10).
AFFINE_RIDGE = 0.05


@dataclasses.dataclass(frozen=True)
class Config:
    """KeyMorph detector, transform and training losses (defaults cite KeyMorph, MedIA 2023).

    Attributes:
      ndim: 2 or 3.
      num_keypoints: ``N`` = 128 (Sec. 5.3).
      widths, downsample: detector stages (conv + instance norm + ReLU, a
        stride-2 conv where ``downsample``; Sec. 4.1, Fig. 2; the official
        code's widths run 32-512). Ours at CPU scale: 8-16-32-32 with maps
        at 1/4 of the input grid.
      grid, spacing: the input cube (voxels, mm): 32^3 at 8 mm (256 mm, the
        field of view of the paper's 256^3 at 1 mm, Sec. 5.1). At 64^3 / 4 mm
        a training step took ~2 s on 2 cores and 280 pretraining steps did
        not move the keypoints off the grid centre; 32^3 is ~5x cheaper.
      transform: training transform, ``"affine"`` (KM-Aff), ``"tps"``
        (KM-TPS-lambda with ``tps_lambda``) or ``"logunif"`` (KM-LogUnif:
        lambda drawn per step, log-uniform on ``lambda_range``).
      tps_lambda: the fixed TPS lambda (Sec. 5.3 trains 0, 0.01, 0.1, 1, 10).
      lambda_range: KM-LogUnif's range. The paper writes LogUnif(0, 10); a
        log-uniform law needs a positive lower end: ours 1e-3.
      rotation, translation_mm, scale, shear: augmentation of every image
        (Sec. 5.3: +-180 degrees; +-15 voxels at 1 mm = 15 mm; [0.8, 1.2];
        [-0.1, 0.1]). Rotations are uniform per Euler angle, as the paper's
        per-parameter uniform sampling.
      deform_magnitude, deform_spacing: the random SVF of the pretraining
        (eq. 12: "random affine and nonlinear transformations"): mean
        displacement (voxels) and control spacing (voxels). Ours.
      dice_weight, mse_weight: the similarity of eq. (10) on inter-subject
        pairs: soft Dice on label maps (supervised, Sec. 4.2.1) and/or
        intensity MSE (unsupervised, Sec. 4.2.2).
      consistency_weight: weight of eq. (11) (same subject, two contrasts);
        its loss is the mean squared keypoint distance in input voxels. The
        paper sums it with equal weight to the pixel MSE; ours scales the
        voxel^2 distance so that it is comparable to the Dice loss.
      pretrain_weight: weight of eq. (12)'s squared keypoint error
        (voxels^2) on pretraining examples.
      pretrain_radius: the pretraining keypoints ``P_0`` are drawn once
        (seed 0) uniformly in a ball of this fraction of the grid about its
        centre (the brain; the paper samples "uniformly over the image
        coordinate grid" of skull-stripped images).
      spread_weight, spread_min: a penalty ``spread_weight * relu(spread_min
        - s)^2`` on each image's smallest principal RMS keypoint spread ``s``
        (input voxels; ours, not in the paper). Without it the CPU-scale
        detector put its keypoints on the brain's mid-sagittal plane (RMS
        spread 2.5 mm across it), where the least-squares affine of eq. 3 is
        ill posed. 0 disables it.
      num_labels: label values after remapping to 0..num_labels-1 (0 =
        background); IXI DLMUSE: 148 + background.
      label_samples: voxels at which soft Dice / MSE are evaluated per pair
        (a uniform random subset of the fixed grid; ours, for CPU time).
    """

    ndim: int = 3
    num_keypoints: int = 128
    widths: tuple = (8, 16, 32, 32)
    downsample: tuple = (True, True, False, False)
    grid: tuple = (32, 32, 32)
    spacing: float = 8.0
    transform: str = "affine"
    tps_lambda: float = 0.0
    lambda_range: tuple = (1e-3, 10.0)
    rotation: float = 180.0
    translation_mm: float = 15.0
    scale: float = 0.2
    shear: float = 0.1
    deform_magnitude: float = 0.5
    deform_spacing: int = 16
    dice_weight: float = 1.0
    mse_weight: float = 0.0
    consistency_weight: float = 0.01
    pretrain_weight: float = 0.01
    pretrain_radius: float = 0.3
    spread_weight: float = 0.0
    spread_min: float = 2.0
    num_labels: int = 149
    label_samples: int = 32768

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {self.transform!r}")
        if len(self.grid) != self.ndim:
            raise ValueError(f"grid {self.grid} must have ndim = {self.ndim} entries")
        check_lambda(self.tps_lambda)


def check_lambda(lam) -> float:
    """``float(lam)`` if it is a finite number >= 0; ValueError otherwise (the CLI's ``--tps-lambda``)."""
    try:
        value = float(lam)
    except (TypeError, ValueError):
        raise ValueError(f"tps lambda must be a number >= 0, got {lam!r}") from None
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"tps lambda must be finite and >= 0, got {lam!r}")
    return value


def init(key, config: Config) -> KeypointDetector:
    """An untrained detector with parameters drawn from ``key``."""
    model = KeypointDetector(config.ndim, 1, num_keypoints=config.num_keypoints, widths=tuple(config.widths),
                             downsample=tuple(config.downsample), rngs=nnx.Rngs(params=key))
    model.config = config
    return model


# ----------------------------------------------------------------------------- input grid

def canonical_grid(data, affine, *, grid=(64, 64, 64), spacing: float = 4.0) -> np.ndarray:
    """The ``(D+1, D+1)`` affine of the network's input cube for a scan (see the module docstring).

    Args:
      data: the scan's voxels (any numeric array, 2D or 3D).
      affine: its voxel -> world (mm) matrix.
      grid: cube size in voxels; spacing: its voxel size (mm).

    Returns:
      float64 matrix: voxel of the cube -> world mm; axes along the world
      axes, centred on the scan's intensity centroid.

    Raises:
      ValueError: ``grid`` does not match the scan's dimension.
    """
    from jaxreg.data.pipeline import normalize

    data = np.asarray(data, np.float32)
    d = data.ndim
    if len(grid) != d:
        raise ValueError(f"grid {tuple(grid)} does not match a {d}D scan")
    w = normalize(data)
    w = np.where(w > 0.05, w, 0.0)
    if not w.any():
        w = np.ones_like(w)
    idx = np.indices(data.shape, dtype=np.float64).reshape(d, -1)
    centroid_vox = idx @ w.reshape(-1).astype(np.float64) / float(w.sum())
    affine = np.asarray(affine, np.float64)
    centroid = affine[:d, :d] @ centroid_vox + affine[:d, d]
    out = np.eye(d + 1)
    out[:d, :d] *= spacing
    out[:d, d] = centroid - spacing * (np.asarray(grid, np.float64) - 1) / 2
    return out


# ----------------------------------------------------------------------------- transforms


def cube_rotations(ndim: int) -> np.ndarray:
    """The proper rotations of the square / cube: ``(4, 2, 2)`` or ``(24, 3, 3)`` float64 signed permutations
    with determinant +1, the identity first (the rotation group averaged over by
    :func:`jaxreg.pipeline.keymorph_world_keypoints`).

    Raises:
      ValueError: ``ndim`` not 2 or 3.
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    out = []
    for perm in itertools.permutations(range(ndim)):
        for signs in itertools.product((1.0, -1.0), repeat=ndim):
            m = np.zeros((ndim, ndim))
            m[np.arange(ndim), perm] = signs
            if np.linalg.det(m) > 0:
                out.append(m)
    return np.stack(out)


def _apply_matrix(m, pts):
    d = pts.shape[-1]
    return pts @ m[:d, :d].T + m[:d, d]


def fit_points(fixed_kp, moving_kp, *, transform: str = "affine", tps_lambda=0.0):
    """The fixed -> moving map of two keypoint sets: ``("affine", (D+1, D+1))`` or ``("tps", TPS)``.

    ``transform`` ``"affine"`` (eq. 3), ``"rigid"`` (least-squares rotation
    + translation, :func:`jaxreg.spatial.fit_rigid`: the official code's rigid
    aligner; returned as an ``"affine"`` matrix), or ``"tps"`` (or
    ``"logunif"``, the same at test time) with ``tps_lambda``; a TPS at
    lambda = 0 interpolates the keypoints exactly.
    """
    if transform == "affine":
        return "affine", fit_affine(fixed_kp, moving_kp)
    if transform == "rigid":
        return "affine", fit_rigid(fixed_kp, moving_kp)
    return "tps", tps_solve(fixed_kp, moving_kp, lam=tps_lambda)


def map_points(fitted, pts, *, chunk: int = 0):
    """Apply a :func:`fit_points` result to ``(M, D)`` points."""
    kind, value = fitted
    return _apply_matrix(value, pts) if kind == "affine" else tps_transform(value, pts, chunk=chunk)


# ----------------------------------------------------------------------------- training

def pretrain_points(config: Config) -> np.ndarray:
    """``P_0`` of eq. (12): ``(N, D)`` float32 input-grid voxels, uniform in a ball about the centre (seed 0)."""
    rng = np.random.default_rng(0)
    d, n = config.ndim, config.num_keypoints
    u = rng.normal(size=(n, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    r = rng.uniform(size=(n, 1)) ** (1.0 / d) * config.pretrain_radius * min(config.grid)
    return ((np.asarray(config.grid, np.float64) - 1) / 2 + u * r).astype(np.float32)


def _augment(key, image, deform, cfg: Config):
    """Random affine (and, scaled by ``deform`` in {0, 1}, SVF) resampling of one ``(*S, 1)`` image.

    Returns ``(augmented, A, inverse_disp)``: ``augmented(y) = image(A (y + u(y)))`` with ``A`` the
    ``(D+1, D+1)`` output -> input voxel matrix, and the inverse deformation's displacement ``(*S, D)``.
    """
    shape = image.shape[:-1]
    ka, kd = jax.random.split(key)
    a = random_affine_matrix(ka, shape, rotation=cfg.rotation, translation=cfg.translation_mm / cfg.spacing,
                             scale=cfg.scale, shear=cfg.shear)
    u, u_inv = random_deformation(kd, shape, mean_magnitude=cfg.deform_magnitude,
                                  control_spacing=cfg.deform_spacing)
    u, u_inv = u * deform, u_inv * deform
    coords = _apply_matrix(a, identity_grid(shape) + u)
    return sample(image, coords, padding="zeros"), a, u_inv


def _soft_onehot(labels, coords, num_labels):
    """Trilinear interpolation of the one-hot encoding of integer ``labels`` at ``(P, D)`` coords (zeros outside)."""
    d = coords.shape[-1]
    shape = jnp.asarray(labels.shape)
    base = jnp.floor(coords)
    frac = coords - base
    out = jnp.zeros((coords.shape[0], num_labels), jnp.float32)
    for corner in range(2 ** d):
        bits = jnp.asarray([(corner >> k) & 1 for k in range(d)], jnp.float32)
        idx = (base + bits).astype(jnp.int32)
        w = jnp.prod(jnp.where(bits > 0, frac, 1.0 - frac), axis=-1)
        inside = jnp.all((idx >= 0) & (idx < shape), axis=-1)
        lab = labels[tuple(jnp.clip(idx[:, k], 0, labels.shape[k] - 1) for k in range(d))]
        out = out + jax.nn.one_hot(lab, num_labels) * (w * inside)[:, None]
    return out


def soft_dice_loss(p, q):
    """``1 - mean_k 2 sum(p_k q_k) / (sum p_k + sum q_k)`` over labels k >= 1 present in either ``(P, K)`` map."""
    inter = jnp.sum(p[:, 1:] * q[:, 1:], 0)
    total = jnp.sum(p[:, 1:], 0) + jnp.sum(q[:, 1:], 0)
    present = total > 1e-6
    dice = 2 * inter / jnp.where(present, total, 1.0)
    return 1.0 - jnp.sum(jnp.where(present, dice, 0.0)) / jnp.maximum(jnp.sum(present), 1)


def _sample_lambda(key, cfg: Config):
    if cfg.transform == "logunif":
        lo, hi = np.log(cfg.lambda_range[0]), np.log(cfg.lambda_range[1])
        return jnp.exp(jax.random.uniform(key, (), minval=lo, maxval=hi))
    return jnp.float32(cfg.tps_lambda)


def loss_fn(model: KeypointDetector, batch: dict, *, key):
    """KeyMorph training loss of a batch (eqs. 10-12), every image randomly augmented (Sec. 5.3).

    Args:
      model: :class:`jaxreg.nn.KeypointDetector` from :func:`init`.
      batch: ``fixed``, ``moving`` ``(B, *S, 1)`` images in [0, 1] on the
        input grid; ``fixed_labels``, ``moving_labels`` ``(B, *S)`` int32
        (0..num_labels-1); ``task`` ``(B,)``: 0 = inter-subject pair (soft
        Dice and/or MSE through the keypoint transform, eq. 10), 1 = one
        subject in two contrasts in voxel correspondence (keypoint
        consistency, eq. 11), 2 = pretraining only; ``pretrain`` ``(B,)``
        1 = also regress ``P_0`` through each image's augmentation (eq. 12).
      key: PRNG key.

    Returns:
      ``(loss, aux)`` with aux ``dice`` (soft Dice loss of the pairs),
      ``mse``, ``consistency`` and ``pretrain`` (mean squared keypoint
      errors, voxels^2), ``similarity``/``smoothness`` (the training stack's
      log layout).
    """
    cfg = getattr(model, "config", None) or Config()
    f, m = batch["fixed"], batch["moving"]
    bsz, shape = f.shape[0], f.shape[1:-1]
    d = len(shape)
    zeros = jnp.zeros((bsz,), jnp.float32)
    task = batch.get("task", zeros)
    pre = batch.get("pretrain", zeros).astype(jnp.float32)
    k_f, k_m, k_pts, k_lam = jax.random.split(key, 4)
    aug = jax.vmap(functools.partial(_augment, cfg=cfg))
    f_aug, a_f, uinv_f = aug(jax.random.split(k_f, bsz), f, pre)
    m_aug, a_m, uinv_m = aug(jax.random.split(k_m, bsz), m, pre)
    kp = model(jnp.concatenate([f_aug, m_aug], 0))
    kp_f, kp_m = kp[:bsz], kp[bsz:]
    p0 = jnp.asarray(pretrain_points(cfg))
    f_labels = batch.get("fixed_labels", jnp.zeros(f.shape[:-1], jnp.int32))
    m_labels = batch.get("moving_labels", jnp.zeros(m.shape[:-1], jnp.int32))

    def one(kpf, kpm, af, am, uf, um, fi, mi, fl, ml, key):
        k_s, k_l = jax.random.split(key)
        # eq. (10): fixed points p (original fixed frame) -> augmented fixed frame -> T -> augmented moving -> moving
        p = jax.random.randint(k_s, (cfg.label_samples, d), 0, jnp.asarray(shape)).astype(jnp.float32)
        y = _apply_matrix(jnp.linalg.inv(af), p)
        fitted = fit_points(kpf, kpm, transform="affine" if cfg.transform == "affine" else "tps",
                            tps_lambda=_sample_lambda(k_l, cfg))
        q = _apply_matrix(am, map_points(fitted, y))
        pf = jax.nn.one_hot(fl[tuple(p[:, k].astype(jnp.int32) for k in range(d))], cfg.num_labels)
        dice = soft_dice_loss(pf, _soft_onehot(ml, q, cfg.num_labels))
        mse = jnp.mean(jnp.square(fi[tuple(p[:, k].astype(jnp.int32) for k in range(d))]
                                  - sample(mi, q, padding="zeros")))
        # eq. (11): both keypoint sets mapped back to the (shared) original frame
        cons = jnp.mean(jnp.sum(jnp.square(_apply_matrix(af, kpf) - _apply_matrix(am, kpm)), -1))

        # eq. (12): P_0 seen through each image's augmentation, y = phi^-1(A^-1 p)
        def target(a, u_inv):
            qa = _apply_matrix(jnp.linalg.inv(a), p0)
            return qa + sample(u_inv, qa, padding="border")

        pre_err = 0.5 * (jnp.mean(jnp.sum(jnp.square(kpf - target(af, uf)), -1))
                         + jnp.mean(jnp.sum(jnp.square(kpm - target(am, um)), -1)))
        return dice, mse, cons, pre_err

    dice, mse, cons, pre_err = jax.vmap(one)(kp_f, kp_m, a_f, a_m, uinv_f, uinv_m, f, m, f_labels, m_labels,
                                             jax.random.split(k_pts, bsz))
    is_pair, is_cons = (task == 0).astype(jnp.float32), (task == 1).astype(jnp.float32)
    spread = principal_spread(kp)[:, -1]
    per = (is_pair * (cfg.dice_weight * dice + cfg.mse_weight * mse) + is_cons * cfg.consistency_weight * cons
           + pre * cfg.pretrain_weight * pre_err)
    loss = jnp.mean(per) + cfg.spread_weight * jnp.mean(jnp.square(jax.nn.relu(cfg.spread_min - spread)))

    def mean_where(x, w):
        return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)

    return loss, {"similarity": mean_where(dice, is_pair), "smoothness": jnp.zeros(()),
                  "dice": mean_where(dice, is_pair), "mse": mean_where(mse, is_pair),
                  "consistency": mean_where(cons, is_cons), "pretrain": mean_where(pre_err, pre),
                  "min_spread": jnp.mean(spread)}


def principal_spread(kp) -> jnp.ndarray:
    """RMS spread of keypoint sets along their principal axes, largest first: ``(..., N, D)`` -> ``(..., D)``.

    In the points' units; the square roots of the eigenvalues of each set's covariance (differentiable).
    A near-zero last value means coplanar points, where the least-squares affine of eq. 3 is ill posed;
    the RMS distance from the centroid is the norm of the result.
    """
    kp = jnp.asarray(kp, jnp.float32)
    c = kp - jnp.mean(kp, axis=-2, keepdims=True)
    cov = jnp.einsum("...ni,...nj->...ij", c, c) / kp.shape[-2]
    return jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(cov)[..., ::-1], 1e-12))


# ----------------------------------------------------------------------------- inference

def keypoints(model: KeypointDetector, image) -> jnp.ndarray:
    """Keypoints of one image on the input grid: ``(*S, 1)`` float in [0, 1] -> ``(N, D)`` float32 voxels (jitted).

    Raises:
      ValueError: an image whose rank does not match the model.
    """
    from jaxreg.methods import forward_one

    return forward_one(model, image, "keypoints")


def register(model: KeypointDetector, fixed, moving, *, transform: str = "affine", tps_lambda: float = 0.0):
    """KeyMorph on two images on input grids: keypoints and the fixed -> moving map between them.

    Args:
      model: trained detector.
      fixed, moving: ``(*S, 1)`` images in [0, 1] (each on its own input
        grid, :func:`canonical_grid`).
      transform: ``"affine"`` (eq. 3), ``"rigid"`` (:func:`fit_points`) or
        ``"tps"`` (eqs. 7-9 with ``tps_lambda``).
      tps_lambda: TPS regulariser (>= 0, finite).

    Returns:
      dict with ``fixed_keypoints``, ``moving_keypoints`` ``(N, D)`` (voxels of
      each input grid) and ``fitted`` (:func:`fit_points`: maps fixed-grid
      voxels to moving-grid voxels).

    Raises:
      ValueError: bad ``transform`` or ``tps_lambda``, or images of the wrong rank.
    """
    if transform not in REGISTER_TRANSFORMS:
        raise ValueError(f"transform must be one of {REGISTER_TRANSFORMS}, got {transform!r}")
    lam = check_lambda(tps_lambda)
    kf, km = keypoints(model, fixed), keypoints(model, moving)
    return {"fixed_keypoints": kf, "moving_keypoints": km,
            "fitted": fit_points(kf, km, transform=transform, tps_lambda=lam)}


def validate(model: KeypointDetector, examples: list) -> dict:
    """Dice (KeyMorph affine, nearest-neighbour labels, labels present in either map) of held-out pairs on the
    input grid, and keypoint repeatability: examples carry ``fixed``, ``moving``, their labels, ``name`` and
    optionally ``moving_rotated`` + ``rotation`` (input-grid voxel matrix, rotated -> original frame).

    Returns ``val_dice`` (mean), ``val_repeat_vox`` (mean distance between the rotated moving image's
    keypoints mapped back and the unrotated moving image's keypoints), ``val_spread_vox`` (RMS distance
    of the fixed keypoints from their centroid: a repeatability is only small relative to it) and
    per-pair rows.
    """
    from jaxreg.metrics import dice as dice_fn
    from jaxreg.spatial import affine_to_disp, warp_labels

    rows = []
    for ex in examples:
        out = register(model, ex["fixed"], ex["moving"])
        disp = affine_to_disp(out["fitted"][1], ex["fixed"].shape[:-1])
        warped = np.asarray(warp_labels(jnp.asarray(ex["moving_labels"]), disp))
        spreads = principal_spread(out["fixed_keypoints"])
        row = {"name": ex["name"], "dice": float(np.nanmean(np.asarray(dice_fn(warped, ex["fixed_labels"])))),
               "spread_vox": float(jnp.linalg.norm(spreads)), "min_spread_vox": float(spreads[-1])}
        if "moving_rotated" in ex:
            kr = keypoints(model, ex["moving_rotated"])
            back = _apply_matrix(jnp.asarray(ex["rotation"], jnp.float32), kr)
            row["repeat_vox"] = float(jnp.mean(jnp.linalg.norm(back - out["moving_keypoints"], axis=-1)))
        rows.append(row)
    res = {"val_dice": float(np.mean([r["dice"] for r in rows])),
           "val_spread_vox": float(np.mean([r["spread_vox"] for r in rows])),
           "val_min_spread_vox": float(np.mean([r["min_spread_vox"] for r in rows])), "val_pairs": rows}
    rep = [r["repeat_vox"] for r in rows if "repeat_vox" in r]
    if rep:
        res["val_repeat_vox"] = float(np.mean(rep))
    return res
