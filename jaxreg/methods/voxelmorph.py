"""VoxelMorph-style learned baseline: an SVF U-Net trained with any similarity + smoothness.

Sources: Balakrishnan et al., "VoxelMorph: a learning framework for
deformable medical image registration", IEEE TMI 2019 (U-Net, loss
``L_sim + lambda * |grad u|^2``, Eq. 2-4); Dalca et al., MedIA 2019
(diffeomorphic SVF integrated by scaling and squaring); Hoopes et al.,
"HyperMorph", IPMI 2021 and Dey et al., "ContraReg", MICCAI 2022 (lambda
conditioning: loss ``(1 - lambda) L_sim + lambda L_reg``, lambda sampled per
example during training and chosen at test time).

API (docs/design.md "Methods"): :class:`Config`, :func:`init`,
:func:`loss_fn`, :func:`register`. Batches are dicts of ``(B, *spatial, C)``
arrays: ``fixed``, ``moving`` and optionally ``mask`` ``(B, *spatial)``
(where the similarity is evaluated).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from jaxreg import losses as L
from jaxreg.nn import HyperFiLM, SVFNet, sample_lambda
from jaxreg.spatial import gaussian_blur, warp

SIMILARITIES = ("mse", "lncc", "mi", "nmi", "local_mi", "mind", "ngf")
INPUT_FEATURES = ("image", "mind")


@dataclasses.dataclass(frozen=True)
class Config:
    """VoxelMorph-style model and loss.

    Attributes:
      ndim: 2 or 3.
      in_channels: channels of each image.
      input_features: what the U-Net sees of each image: ``"image"`` (the
        intensities, as VoxelMorph) or ``"mind"`` (its MIND-SSC descriptor,
        radius 1, dilation 1: 12 channels in 3D, 4 in 2D, computed inside
        the model, so training and :func:`register` agree). MIND-SSC maps
        different contrasts of the same anatomy to similar descriptors
        (Heinrich et al., MICCAI 2013), so a cross-contrast pair reaches
        the network as nearly a mono-contrast one; the loss is unchanged.
        Measured (2D brats T2 -> T1 slices, full widths, batch 4, lr 1e-3,
        reg_weight 0.02, 2 cores): validation endpoint error 4.15 mm before,
        4.61 / 4.62 / 4.66 / 4.50 mm at steps 100 / 300 / 500 / 700 with
        MIND inputs, so it did not make cross-contrast correspondence
        learnable in that budget (the same run with T1 -> deformed T1 and
        image inputs reached 1.90 mm).
      enc_features, dec_features, final_features: U-Net widths (VoxelMorph
        defaults, TMI 2019 Fig. 3).
      norm: instance norm in the conv blocks (off in VoxelMorph).
      out_level: resolution level of the U-Net output and the predicted
        velocity (0 = input grid as VoxelMorph; 1 = half resolution: the
        full-resolution decoder convs are left out, ~6x fewer FLOPs, and with
        ``int_downsize = 2`` the velocity is integrated where it is predicted).
      int_steps, int_downsize: scaling-and-squaring steps (7) and the
        downsampling of the integration grid (2), as the voxelmorph package.
      velocity_sigma: Gaussian smoothing (voxels of the velocity's grid) of
        the predicted velocity before integration (0 = none), as the
        instance optimiser's ``field_sigma``: the network can only output
        smooth fields.
      bidirectional: also return ``exp(-v)`` and add the symmetric
        similarity term ``L_sim(moving, fixed o exp(-v))`` (Dalca 2019).
      similarity: one of ``SIMILARITIES`` (``mind`` = MSE of MIND-SSC
        descriptors, radius 1, dilation 1, the instance-optimisation default).
      lncc_window, mi_bins, local_mi_patch: similarity parameters.
      reg_field: the field ``L_reg`` smooths: ``"disp"`` (VoxelMorph) or
        ``"velocity"`` (ContraReg's ``L_reg`` on ``v``, so that the baselines
        of its comparison share its regulariser).
      loss_sigma: Gaussian pre-smoothing (voxels) of the moving image before
        it is warped and of the loss target, for the similarity term only
        (0 = none). Inter-subject MIND-SSC, LNCC and MSE all drop when the
        moving image is blurred (a 0.25-voxel uniform shift, which blurs
        through linear interpolation, lowered MIND-SSC by 2.6 % on a 3 mm
        IXI pair), so an unsmoothed loss rewards sub-voxel shifts that do
        not align anatomy; sigma = 1 removes that (+0.35 %).
      loss_scales: the similarity is averaged over this many resolutions (the
        target and the warped image downsampled by 2 per scale, antialiased
        linear resize), widening its capture range for large displacements
        (multi-resolution losses, e.g. LapIRN, Mok & Chung, MICCAI 2020).
      loss_mask_threshold: if > 0, the similarity is averaged only over the
        target's foreground, ``target > threshold`` (images in [0, 1]; after
        ``loss_sigma`` smoothing), times any ``batch["mask"]``. On 3 mm IXI
        T1 pairs half of the unmasked MIND-SSC loss sits in the air around
        the head (noise, contrast-normalised by MIND), which a network can
        lower by moving background noise.
      reg_weight: smoothness weight (diffusion ``|grad u|^2`` of the
        displacement in voxels) when not lambda-conditioned.
      hyper: condition the network on lambda by a FiLM hypernetwork; the loss
        is ``(1 - lambda) L_sim + lambda * reg_scale * L_reg`` with lambda
        drawn per example from ``lambda_range`` (``lambda_distribution``:
        ``uniform`` or ``loguniform``).
      reg_scale: brings ``L_reg`` to the similarity's scale under ``hyper``.
      supervised: a diagnostic, not a method of the papers: ``L_sim`` is the
        mean squared endpoint error (voxels^2) between the predicted
        displacement and ``batch["disp_true"]`` over the fixed image's
        foreground (``> 0.05``), instead of an image similarity. A network
        that cannot regress a known field from its inputs this way points at
        its inputs, normalisation, capacity or data, not at the loss (issue 14).
    """

    ndim: int = 3
    in_channels: int = 1
    input_features: str = "image"
    enc_features: tuple = (16, 32, 32, 32)
    dec_features: tuple = (32, 32, 32, 32)
    final_features: tuple = (32, 16, 16)
    norm: bool = False
    out_level: int = 0
    int_steps: int = 7
    int_downsize: int = 2
    velocity_sigma: float = 0.0
    bidirectional: bool = False
    similarity: str = "mind"
    loss_sigma: float = 0.0
    loss_scales: int = 1
    loss_mask_threshold: float = 0.0
    lncc_window: int = 9
    mi_bins: int = 32
    local_mi_patch: int = 9
    reg_field: str = "disp"
    reg_weight: float = 1.0
    hyper: bool = False
    lambda_range: tuple = (0.0, 1.0)
    lambda_distribution: str = "uniform"
    reg_scale: float = 1.0
    supervised: bool = False

    def __post_init__(self):
        if self.ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {self.ndim}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.lambda_distribution not in ("uniform", "loguniform"):
            raise ValueError(f"lambda_distribution must be 'uniform' or 'loguniform', got {self.lambda_distribution!r}")
        if len(self.lambda_range) != 2 or not 0.0 <= self.lambda_range[0] <= self.lambda_range[1] <= 1.0:
            raise ValueError(f"lambda_range must be (low, high) with 0 <= low <= high <= 1, got {self.lambda_range}")
        if self.input_features not in INPUT_FEATURES:
            raise ValueError(f"input_features must be one of {INPUT_FEATURES}, got {self.input_features!r}")
        if self.loss_scales < 1:
            raise ValueError(f"loss_scales must be >= 1, got {self.loss_scales}")
        if self.loss_sigma < 0:
            raise ValueError(f"loss_sigma must be >= 0, got {self.loss_sigma}")
        if self.reg_field not in ("disp", "velocity"):
            raise ValueError(f"reg_field must be 'disp' or 'velocity', got {self.reg_field!r}")
        if self.reg_weight < 0:
            raise ValueError(f"reg_weight must be >= 0, got {self.reg_weight}")


def _mind(image):
    """The MIND-SSC descriptor of the similarity and of ``input_features="mind"`` (radius 1, dilation 1)."""
    return L.mind_ssc(image, radius=1, dilation=1)


class VoxelMorph(nnx.Module):
    """SVF network plus (if ``config.hyper``) the lambda hypernetwork."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        self.config = config
        net_channels = config.in_channels
        if config.input_features == "mind":
            probe = jax.ShapeDtypeStruct((4,) * config.ndim + (config.in_channels,), jnp.float32)
            net_channels = jax.eval_shape(_mind, probe).shape[-1]
        self.net = SVFNet(config.ndim, net_channels, enc_features=config.enc_features,
                          dec_features=config.dec_features, final_features=config.final_features,
                          norm=config.norm, out_level=config.out_level, int_steps=config.int_steps,
                          int_downsize=config.int_downsize, velocity_sigma=config.velocity_sigma,
                          bidirectional=config.bidirectional, rngs=rngs)
        self.hyper = HyperFiLM(self.net.conditioned_features, rngs=rngs) if config.hyper else None

    def __call__(self, fixed, moving, lam=None, *, inverse: bool | None = None):
        """``(velocity, disp, inverse_disp)`` for a batch; ``lam`` ``(B,)`` is required iff ``hyper``.

        ``inverse`` (default ``config.bidirectional``) also computes ``exp(-v)``.
        """
        if (self.hyper is None) != (lam is None):
            raise ValueError("lam must be given exactly when the model is lambda-conditioned (config.hyper)")
        film = None if lam is None else self.hyper(lam)
        if self.config.input_features == "mind":
            fixed, moving = jax.vmap(_mind)(fixed), jax.vmap(_mind)(moving)
        return self.net(fixed, moving, film, inverse=inverse)


def init(key, config: Config) -> VoxelMorph:
    """A freshly initialised :class:`VoxelMorph` (deterministic for ``key``)."""
    return VoxelMorph(config, rngs=nnx.Rngs(params=key))


def similarity(config: Config, fixed, warped, mask=None) -> Float[Array, ""]:
    """The configured similarity loss of one unbatched pair ``(*spatial, C)`` (lower is better)."""
    s = config.similarity
    if s == "mind":
        return L.descriptor_mse(_mind(fixed), _mind(warped), mask=mask)
    if s == "lncc":
        return L.lncc(fixed, warped, window=config.lncc_window, mask=mask)
    if s == "mi":
        return L.mutual_information(fixed, warped, bins=config.mi_bins, mask=mask)
    if s == "nmi":
        return L.nmi(fixed, warped, bins=config.mi_bins, mask=mask)
    if s == "ngf":
        return L.ngf(fixed, warped, mask=mask)
    if s == "local_mi":
        return L.local_mi(fixed, warped, bins=config.mi_bins, patch=config.local_mi_patch, mask=mask)
    return L.mse(fixed, warped, mask=mask)


def multiscale_similarity(config: Config, fixed, warped, mask=None) -> Float[Array, ""]:
    """Mean of :func:`similarity` over ``config.loss_scales`` resolutions (halved per scale).

    Inputs ``(*spatial, C)``; a mask is downsampled with the images. Scales
    stop early once an axis would drop below 8 voxels.
    """
    total, n = similarity(config, fixed, warped, mask), 1
    for _ in range(config.loss_scales - 1):
        shape = tuple(s // 2 for s in fixed.shape[:-1])
        if min(shape) < 8:
            break
        down = lambda x: jax.image.resize(x, shape + x.shape[len(shape):], "linear")  # noqa: E731
        fixed, warped = down(fixed), down(warped)
        mask = None if mask is None else down(mask)
        total, n = total + similarity(config, fixed, warped, mask), n + 1
    return total / n


def check_batch(batch, config):
    """Raise ValueError unless ``batch`` holds ``fixed``/``moving`` of one shape ``(B, *spatial[ndim], in_channels)``."""
    for k in ("fixed", "moving"):
        if k not in batch:
            raise ValueError(f"batch needs 'fixed' and 'moving', got keys {sorted(batch)}")
        x = batch[k]
        if x.ndim != config.ndim + 2 or x.shape[-1] != config.in_channels:
            raise ValueError(f"batch[{k!r}] must be (B, *spatial[{config.ndim}], {config.in_channels}), got {x.shape}")
    if batch["fixed"].shape != batch["moving"].shape:
        raise ValueError(f"fixed {batch['fixed'].shape} and moving {batch['moving'].shape} differ")


def loss_fn(model: VoxelMorph, batch: dict, *, key) -> tuple[Float[Array, ""], dict]:
    """Training loss of a batch; returns ``(loss, aux)``.

    ``loss = mean_b [L_sim + reg_weight * L_reg]`` or, lambda-conditioned,
    ``mean_b [(1 - lam_b) L_sim + lam_b * reg_scale * L_reg]`` with ``lam_b``
    drawn from ``key``. ``L_sim`` (after ``loss_sigma`` pre-smoothing) compares the warped moving image with
    ``batch["fixed_target"]`` when present (the fixed image before an input
    contrast augmentation, see ``jaxreg.data.PairSource``), else with
    ``batch["fixed"]``. ``L_reg`` = diffusion ``mean |grad u|^2`` of the
    displacement (voxels). ``aux``: ``similarity``, ``smoothness`` (batch
    means, float32 scalars) and ``lam`` ``(B,)`` (or None).

    Raises:
      ValueError: on missing keys or mismatched shapes (at trace time).
    """
    cfg = model.config
    check_batch(batch, cfg)
    fixed, moving = batch["fixed"], batch["moving"]
    b = fixed.shape[0]
    mask = batch.get("mask")
    lam = sample_lambda(key, b, low=cfg.lambda_range[0], high=cfg.lambda_range[1],
                        distribution=cfg.lambda_distribution) if cfg.hyper else None
    velocity, disp, inv = model(fixed, moving, lam)
    target = batch.get("fixed_target", fixed)
    if target.shape != fixed.shape:
        raise ValueError(f"batch['fixed_target'] {target.shape} must match batch['fixed'] {fixed.shape}")
    if cfg.loss_sigma > 0:
        blur = jax.vmap(lambda x: gaussian_blur(x, cfg.loss_sigma))
        target, moving = blur(target), blur(moving)
    warped = jax.vmap(warp)(moving, disp)
    masks = mask if mask is not None else jnp.ones(fixed.shape[:-1], fixed.dtype)
    if cfg.loss_mask_threshold > 0:
        fg = jax.lax.stop_gradient(jnp.mean(target, axis=-1) > cfg.loss_mask_threshold)
        masks = masks * fg.astype(masks.dtype)
    if cfg.supervised:
        if "disp_true" not in batch or batch["disp_true"].shape != disp.shape:
            raise ValueError(f"supervised=True needs batch['disp_true'] of shape {disp.shape}")
        fg = jnp.mean(fixed, axis=-1) > 0.05  # squared endpoint error = D x the per-component MSE
        sim = jax.vmap(lambda d, t, m: d.shape[-1] * L.mse(d, t, mask=m))(disp, batch["disp_true"], fg)
    else:
        sim = jax.vmap(lambda f, w, m: multiscale_similarity(cfg, f, w, m))(target, warped, masks)
    if cfg.bidirectional and not cfg.supervised:
        warped_f = jax.vmap(warp)(target, inv)
        sim = 0.5 * (sim + jax.vmap(lambda f, w: multiscale_similarity(cfg, f, w))(moving, warped_f))
    reg = jax.vmap(L.diffusion)(velocity if cfg.reg_field == "velocity" else disp)
    if cfg.hyper:
        per = (1.0 - lam) * sim + lam * cfg.reg_scale * reg
    else:
        per = sim + cfg.reg_weight * reg
    return jnp.mean(per), {"similarity": jnp.mean(sim), "smoothness": jnp.mean(reg), "lam": lam}


class Result(NamedTuple):
    """Output of :func:`register` (batched, voxel units of the input grid).

    Attributes:
      disp: ``(B, *spatial, D)`` ``exp(v)``; ``warped(x) = moving(x + disp(x))``.
      inverse_disp: ``(B, *spatial, D)`` ``exp(-v)``.
      velocity: ``(B, *spatial, D)`` the network's field (the displacement itself for a displacement network).
      warped: ``(B, *spatial, C)`` moving warped onto the fixed grid.
    """

    disp: Array
    inverse_disp: Array
    velocity: Array
    warped: Array


def register(model: VoxelMorph, fixed, moving, *, lam: float | None = None) -> Result:
    """Register ``moving`` to ``fixed`` with a trained model (one forward pass).

    Args:
      fixed, moving: ``(B, *spatial, C)`` or unbatched ``(*spatial, C)``
        float32 images on the same grid, normalised as in training
        (``[0, 1]``), spatial sizes divisible by ``2 ** levels``.
      lam: the regularisation weight for a lambda-conditioned model (required
        then; ignored otherwise is an error).

    Returns:
      :class:`Result` (unbatched if the inputs were).

    Raises:
      ValueError: bad shapes, or ``lam`` given/missing against ``config.hyper``.
    """
    cfg = model.config
    unbatched = jnp.ndim(fixed) == cfg.ndim + 1
    f = jnp.asarray(fixed, jnp.float32)[None] if unbatched else jnp.asarray(fixed, jnp.float32)
    m = jnp.asarray(moving, jnp.float32)[None] if unbatched else jnp.asarray(moving, jnp.float32)
    check_batch({"fixed": f, "moving": m}, cfg)
    if cfg.hyper and lam is None:
        raise ValueError("this model is lambda-conditioned: pass lam in [0, 1]")
    if not cfg.hyper and lam is not None:
        raise ValueError("lam was given but the model is not lambda-conditioned")
    lam_b = None if lam is None else jnp.full((f.shape[0],), lam, jnp.float32)
    v, disp, inv = _forward(model, f, m, lam_b)
    warped = jax.vmap(warp)(m, disp)
    out = Result(disp, inv, v, warped)
    return Result(*(x[0] for x in out)) if unbatched else out


@nnx.jit
def _forward(model, f, m, lam):
    return model(f, m, lam, inverse=True)
