"""CAR: contrast-agnostic registration learned from one contrast (random convolutions + contrast-invariant latents).

Source: Wang, Du, Zheng, Luo and Qin, "CAR: Contrast-Agnostic Deformable
Medical Image Registration with Contrast-Invariant Latent Regularization",
WBIR 2024 (../shared/papers/car_wang2024.md). Details the paper leaves open
were checked against the official code (Yinsong0510/CAR, PyTorch, 2D) and are
marked "(code)".

Training sees one contrast only. Every step draws two random-convolution
(RC) contrasts ``C1, C2`` of the moving and of the fixed image (Sec. 2.1,
:func:`jaxreg.augment.random_convolution`), registers both augmented pairs
with the same network, and scores the warped *pre-augmentation* moving image
against the pre-augmentation fixed image with a mono-contrast LNCC (Sec. 2.3,
eq. 3); the contrast-invariant latent regularisation (CLR, Sec. 2.2, eq. 2)
pulls the projected latents of the two contrasts of the same image together.

API (docs/design.md "Methods"): :class:`Config`, :func:`init`,
:func:`loss_fn`, :func:`register`. Batches are dicts of ``(B, *spatial, 1)``
float32 arrays in [0, 1]: ``fixed`` and ``moving`` (same contrast).
"""
from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from jaxreg import losses as L
from jaxreg.augment import random_convolution
from jaxreg.methods.voxelmorph import Result, check_batch
from jaxreg.nn.siamese import CAR_DEC, CAR_ENC, CAR_FINAL, SiameseRegNet
from jaxreg.spatial import warp

CONTRAST_LOSSES = ("mse", "infonce", "mse_var")


@dataclasses.dataclass(frozen=True)
class Config:
    """CAR model and loss; defaults are the paper's (or, where it is silent, the official code's).

    Attributes:
      ndim: 2 (the paper) or 3 (an extension; the paper's future work).
      in_channels: channels of each image (1).
      enc_features, dec_features, final_features: widths (Sec. 3: 128 in the
        encoders, 256 in the decoder; (code): 4 encoder levels, 4 decoder
        blocks and 3 full-resolution blocks).
      proj_features: output channels of the 1x1 projection head (Sec. 3: 32).
      out_level: decoder output resolution ``1 / 2**out_level`` (0 = full, as
        the paper; 1 = the code's ``half_res``, a CPU-scale saving).
      int_steps: 0 = the network outputs a displacement ((code): ``int_steps=0``);
        > 0 = a stationary velocity integrated by scaling and squaring.
      int_downsize: integration grid downsampling when ``int_steps > 0``.
      rc_layers: RC layers (Sec. 3: 4); 0 = no augmentation (a VoxelMorph-style
        model trained on the one contrast, "VXM-LNCC trained on T1 only").
      rc_channels: intermediate RC channels ((code): 8).
      rc_kernel: RC kernel size (1 = CAR; 3 = the "RC-3" ablation, Table 3).
      rc_weight_range: RC weights ``U(low, high)``, then zero-centred (Sec. 3: U(0, 10)).
      rc_bias_std: RC biases ``N(0, std)`` ((code): 1).
      rc_slope: LeakyReLU slope after each RC layer (Sec. 3: 0.2).
      lncc_window: LNCC window ((code): VoxelMorph's NCC, 9).
      reg_weight: ``lambda_1`` of eq. 3 on VoxelMorph's ``Grad('l2')`` (the
        mean squared forward difference, :func:`jaxreg.losses.diffusion` /
        ``D**2``) of the displacement ((code): 0.3).
      contrast_weight: ``lambda_2`` of eq. 3 (0 = the "w/o CLR" ablation).
        0.1 = the code's 0.2 on a loss that sums the two augmented pairs'
        terms, here averaged.
      contrast_loss: ``"mse"`` (eq. 2, averaged over locations and channels,
        as ``torch.nn.MSELoss`` in the code) or ``"infonce"`` (the ablation
        "CAR with InfoNCE", Table 3: positive = the same latent location in
        the other contrast, negatives = the other locations of that image)
        or ``"mse_var"`` (not in the paper; docs/experiments/issue15_clr.md):
        eq. 2 plus VICReg's variance hinge (Bardes et al., ICLR 2022, eq. 1)
        on each projection channel's std over the batch and foreground locations,
        ``mean_c max(0, 1/sqrt(P) - std_c)`` per view (``1/sqrt(P)``: the
        std of isotropic unit vectors), which removes eq. 2's trivial
        minimiser (a projection head mapping everything to one vector; the
        trained MSE head had collapsed).
      infonce_temperature: tau of the InfoNCE ablation.
    """

    ndim: int = 2
    in_channels: int = 1
    enc_features: tuple = CAR_ENC
    dec_features: tuple = CAR_DEC
    final_features: tuple = CAR_FINAL
    proj_features: int = 32
    out_level: int = 0
    int_steps: int = 0
    int_downsize: int = 2
    rc_layers: int = 4
    rc_channels: int = 8
    rc_kernel: int = 1
    rc_weight_range: tuple = (0.0, 10.0)
    rc_bias_std: float = 1.0
    rc_slope: float = 0.2
    lncc_window: int = 9
    reg_weight: float = 0.3
    contrast_weight: float = 0.1
    contrast_loss: str = "mse"
    infonce_temperature: float = 0.07

    def __post_init__(self):
        if self.ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {self.ndim}")
        if self.contrast_loss not in CONTRAST_LOSSES:
            raise ValueError(f"contrast_loss must be one of {CONTRAST_LOSSES}, got {self.contrast_loss!r}")
        if self.rc_layers < 0:
            raise ValueError(f"rc_layers must be >= 0, got {self.rc_layers}")
        if self.rc_kernel < 1 or self.rc_kernel % 2 == 0:
            raise ValueError(f"rc_kernel must be a positive odd int, got {self.rc_kernel}")
        if self.reg_weight < 0 or self.contrast_weight < 0:
            raise ValueError(f"reg_weight and contrast_weight must be >= 0, got {self.reg_weight}, "
                             f"{self.contrast_weight}")
        if self.contrast_weight > 0 and self.rc_layers == 0:
            raise ValueError("contrast_weight > 0 needs rc_layers > 0 (the latents of two augmentations)")

    @property
    def similarity(self) -> str:
        """The training similarity (LNCC), named as the other learned methods' configs name theirs."""
        return "lncc"

    @property
    def hyper(self) -> bool:
        """CAR is not lambda-conditioned."""
        return False


class CAR(nnx.Module):
    """The CAR network (:class:`jaxreg.nn.siamese.SiameseRegNet`) behind the learned-method call convention."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        self.config = config
        self.net = SiameseRegNet(config.ndim, config.in_channels, enc_features=config.enc_features,
                                 dec_features=config.dec_features, final_features=config.final_features,
                                 proj_features=config.proj_features, out_level=config.out_level,
                                 int_steps=config.int_steps, int_downsize=config.int_downsize, rngs=rngs)

    def __call__(self, fixed, moving, lam=None, *, inverse: bool | None = None):
        """``(field, disp, inverse_disp)`` for ``(B, *spatial, C)`` images (``inverse_disp`` None unless asked).

        ``field`` is the displacement (``int_steps = 0``) or the velocity.

        Raises:
          ValueError: ``lam`` given (CAR is not lambda-conditioned), or bad shapes.
        """
        if lam is not None:
            raise ValueError("CAR is not lambda-conditioned: lam must be None")
        field, disp, inv, _, _ = self.net(fixed, moving, inverse=bool(inverse))
        return field, disp, inv


def init(key, config: Config) -> CAR:
    """A freshly initialised :class:`CAR` (deterministic for ``key``)."""
    return CAR(config, rngs=nnx.Rngs(params=key))


def augment(config: Config, key, images: Float[Array, "B *spatial C"]) -> Float[Array, "B *spatial 1"]:
    """One RC contrast per image of a batch (independent keys), or the images unchanged when ``rc_layers == 0``."""
    if config.rc_layers == 0:
        return images
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, x: random_convolution(
        k, x, layers=config.rc_layers, channels=config.rc_channels, kernel_size=config.rc_kernel,
        weight_range=config.rc_weight_range, bias_std=config.rc_bias_std,
        negative_slope=config.rc_slope))(keys, images)


def contrast_invariance(config: Config, proj_1, proj_2, mask=None) -> Float[Array, ""]:
    """``L_contrast`` between two ``(B, *latent, P)`` unit projections of the same images (eq. 2 or InfoNCE).

    ``mse``: mean over batch, locations and channels of the squared difference
    (eq. 2 up to the channel mean; range [0, 4 / P]). ``infonce``: mean over
    the batch of InfoNCE with the same location as positive.
    """
    if config.contrast_loss == "mse":
        return jnp.mean(jnp.square(proj_1 - proj_2))
    if config.contrast_loss == "mse_var":
        return jnp.mean(jnp.square(proj_1 - proj_2)) + 0.5 * (
            projection_variance_hinge(proj_1, mask) + projection_variance_hinge(proj_2, mask))
    p = proj_1.shape[-1]
    flat = lambda x: x.reshape(x.shape[0], -1, p)  # noqa: E731
    return jnp.mean(jax.vmap(lambda a, b: L.infonce(a, b, temperature=config.infonce_temperature))(
        flat(proj_1), flat(proj_2)))


def projection_variance_hinge(proj: Float[Array, "B *latent P"], mask=None) -> Float[Array, ""]:
    """VICReg's variance term for unit projections: ``mean_c max(0, 1/sqrt(P) - std_c)``, std over batch and
    locations (eps 1e-4 inside the sqrt), weighted by ``mask`` (``(B, *latent)`` in [0, 1], e.g. the
    foreground; None = every location). 0 for well-spread projections; ``~1/sqrt(P)`` when they collapse to
    one vector. Over all locations a network meets it by separating the background from the foreground
    (docs/experiments/issue15_clr.md), hence the mask. Bardes et al., "VICReg", ICLR 2022, eq. 1."""
    p = proj.shape[-1]
    flat = proj.reshape(-1, p)
    w = jnp.ones(flat.shape[:1], flat.dtype) if mask is None else mask.reshape(-1).astype(flat.dtype)
    w = w / jnp.maximum(jnp.sum(w), 1e-6)
    mean = jnp.sum(w[:, None] * flat, axis=0)
    var = jnp.sum(w[:, None] * jnp.square(flat - mean), axis=0)
    std = jnp.sqrt(var + 1e-4)
    return jnp.mean(jax.nn.relu(1.0 / np.sqrt(p) - std))


def loss_fn(model: CAR, batch: dict, *, key) -> tuple[Float[Array, ""], dict]:
    """CAR training loss of a mono-contrast batch (eq. 3); returns ``(loss, aux)``.

    ``loss = mean_{c in {1, 2}} [-LNCC(M o phi_c, F) + lambda_1 Grad(u_c)] +
    lambda_2 L_contrast``, where ``phi_c`` registers the RC-augmented pair
    ``(M_c, F_c)`` and the LNCC compares the pre-augmentation images. With
    ``rc_layers == 0`` one unaugmented pass replaces the two. ``aux``:
    ``similarity`` (mean LNCC loss, in [-1, 0]), ``smoothness``,
    ``contrast`` (float32 scalars).

    Raises:
      ValueError: missing keys or mismatched shapes (at trace time).
    """
    cfg = model.config
    check_batch(batch, cfg)
    fixed, moving = batch["fixed"], batch["moving"]
    d = cfg.ndim

    def one(f_in, m_in):
        _, disp, _, proj_f, proj_m = model.net(f_in, m_in)
        warped = jax.vmap(warp)(moving, disp)
        sim = jnp.mean(jax.vmap(lambda f, w: L.lncc(f, w, window=cfg.lncc_window))(fixed, warped))
        reg = jnp.mean(jax.vmap(L.diffusion)(disp)) / d ** 2
        return sim, reg, proj_f, proj_m

    if cfg.rc_layers == 0:
        sim, reg, _, _ = one(fixed, moving)
        contrast = jnp.zeros((), jnp.float32)
    else:
        k = jax.random.split(key, 4)
        s1, r1, pf1, pm1 = one(augment(cfg, k[0], fixed), augment(cfg, k[1], moving))
        s2, r2, pf2, pm2 = one(augment(cfg, k[2], fixed), augment(cfg, k[3], moving))
        sim, reg = 0.5 * (s1 + s2), 0.5 * (r1 + r2)
        mask_m = mask_f = None
        if cfg.contrast_loss == "mse_var":  # the hinge over the foreground (latent resolution)
            mask_m, mask_f = (L.resize_mask(x[..., 0] > 0.05, x.shape[:1] + pm1.shape[1:-1])
                              for x in (moving, fixed))
        contrast = contrast_invariance(cfg, pm1, pm2, mask_m) + contrast_invariance(cfg, pf1, pf2, mask_f)
    loss = sim + cfg.reg_weight * reg + cfg.contrast_weight * contrast
    return loss, {"similarity": sim, "smoothness": reg, "contrast": contrast}


@nnx.jit
def _forward(model, f, m):
    return model(f, m, inverse=True)


def register(model: CAR, fixed, moving, *, lam: float | None = None) -> Result:
    """Register ``moving`` to ``fixed`` (any contrasts) with a trained CAR network: one forward pass.

    Args:
      fixed, moving: ``(B, *spatial, 1)`` or unbatched ``(*spatial, 1)``
        float32 images on the same grid, normalised to [0, 1] as in training
        (0.5-99.5 percentiles), skull-stripped like the training data,
        spatial sizes divisible by ``2 ** len(enc_features)``.
      lam: must be None (kept for the learned-method call convention).

    Returns:
      :class:`jaxreg.methods.voxelmorph.Result` (unbatched if the inputs were): ``disp``,
      ``inverse_disp`` (fixed-point inverse of a displacement, ``exp(-v)`` of an SVF), ``velocity``
      (the network's field: the displacement when ``int_steps == 0``) and ``warped``.

    Raises:
      ValueError: bad shapes, or ``lam`` given.
    """
    cfg = model.config
    if lam is not None:
        raise ValueError("lam was given but CAR is not lambda-conditioned")
    unbatched = jnp.ndim(fixed) == cfg.ndim + 1
    f = jnp.asarray(fixed, jnp.float32)
    m = jnp.asarray(moving, jnp.float32)
    if unbatched:
        f, m = f[None], m[None]
    check_batch({"fixed": f, "moving": m}, cfg)
    field, disp, inv = _forward(model, f, m)
    warped = jax.vmap(warp)(m, disp)
    out = Result(disp, inv, field, warped)
    return Result(*(x[0] for x in out)) if unbatched else out
