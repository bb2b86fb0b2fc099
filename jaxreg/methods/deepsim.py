"""DeepSim: a registration network trained with the cosine similarity of frozen learned features.

Source: Czolbe, Krause, Feragen, "DeepSim: Semantic similarity metrics for
learned image registration", MIDL 2021 (../shared/papers/deepsim_czolbe2021.md).

* Similarity (Sec. 3, eq. 5): ``DeepSim(I o Phi, J) = (1/L) sum_l mean_p
  cos(F^l_p(I o Phi), F^l_p(J))`` over the three encoder stages of a feature
  extractor pretrained as an auto-encoder (DeepSim-AE) or a segmentation
  network (DeepSim-seg) and then frozen (Fig. 1, two-step training);
  :func:`jaxreg.losses.deepsim`, extractor :class:`jaxreg.nn.DeepSimNet`,
  pretraining ``jaxreg.methods.features``.
* Objective (eq. 1): ``D + lambda R`` with the diffusion regulariser (eq. 2)
  and ``D = 1 - DeepSim``; lambda-conditioned (``hyper``) as every row of the
  ContraReg-style comparison: ``(1 - lambda) D + lambda reg_scale R``.
* Network: :class:`jaxreg.methods.voxelmorph.VoxelMorph` (the paper: a 2D/3D
  U-Net, Sec. 4), so the baselines (MSE, NCC, MI, ...) run the same network.

API (docs/design.md "Methods"): :class:`Config`, :func:`init`,
:func:`loss_fn`, :func:`register`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from jaxreg import losses as L
from jaxreg.methods import voxelmorph
from jaxreg.methods.features import frozen
from jaxreg.methods.voxelmorph import Result, check_batch
from jaxreg.nn import sample_lambda
from jaxreg.nn.features import DeepSimNet
from jaxreg.spatial import warp


@dataclasses.dataclass(frozen=True)
class Config:
    """DeepSim model and loss.

    Attributes:
      ndim, in_channels: 2 or 3; 1.
      enc_features, dec_features, final_features, norm, out_level, int_steps,
        int_downsize: the registration network (:class:`jaxreg.methods.voxelmorph.Config`).
      features_checkpoint: a ``features`` run of kind ``deepsim_ae`` or
        ``deepsim_seg`` (read by :func:`init`); "" = random frozen features.
      feature_head: ``"ae"`` or ``"seg"`` (must match the checkpoint).
      feature_widths: the extractor's widths (() = the paper's: 64-128-256
        in 2D, 32-64-128 in 3D).
      feature_classes: output classes of a ``seg`` extractor (checkpoint's).
      hyper, lambda_range, reg_scale: lambda conditioning, ``(1 - lam) D +
        lam reg_scale R``.
      reg_weight: ``lambda`` of eq. 1 when not ``hyper``.
    """

    ndim: int = 2
    in_channels: int = 1
    enc_features: tuple = (16, 32, 32, 32)
    dec_features: tuple = (32, 32, 32, 32)
    final_features: tuple = (32, 16, 16)
    norm: bool = False
    out_level: int = 0
    int_steps: int = 7
    int_downsize: int = 2
    features_checkpoint: str = ""
    feature_head: str = "ae"
    feature_widths: tuple = ()
    feature_classes: int = 0
    hyper: bool = True
    lambda_range: tuple = (0.0, 1.0)
    reg_scale: float = 1.0
    reg_weight: float = 1.0

    def __post_init__(self):
        if self.ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {self.ndim}")
        if self.feature_head not in ("ae", "seg"):
            raise ValueError(f"feature_head must be 'ae' or 'seg', got {self.feature_head!r}")
        if self.feature_head == "seg" and self.feature_classes < 2:
            raise ValueError("feature_head='seg' needs feature_classes >= 2 (the checkpoint's classes)")

    @property
    def similarity(self) -> str:
        return f"deepsim_{self.feature_head}"

    def network_config(self) -> voxelmorph.Config:
        return voxelmorph.Config(ndim=self.ndim, in_channels=self.in_channels, enc_features=self.enc_features,
                                 dec_features=self.dec_features, final_features=self.final_features, norm=self.norm,
                                 out_level=self.out_level, int_steps=self.int_steps, int_downsize=self.int_downsize,
                                 hyper=self.hyper, lambda_range=self.lambda_range)


class DeepSim(nnx.Module):
    """Registration network + the frozen DeepSim feature extractor."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        self.config, self.ndim = config, config.ndim
        self.reg = voxelmorph.VoxelMorph(config.network_config(), rngs=rngs)
        self.extractor = DeepSimNet(config.ndim, 1, features=tuple(config.feature_widths) or None,
                                    head=config.feature_head, out_channels=config.feature_classes, rngs=rngs)

    def __call__(self, fixed, moving, lam=None, *, inverse: bool | None = None):
        """``(velocity, disp, inverse_disp)`` of the registration network."""
        return self.reg(fixed, moving, lam, inverse=inverse)


def init(key, config: Config) -> DeepSim:
    """A fresh :class:`DeepSim`; the extractor comes from ``config.features_checkpoint`` when set.

    Raises:
      FileNotFoundError / ValueError: a missing run, another kind or
        dimensionality, or an extractor of other widths.
    """
    model = DeepSim(config, rngs=nnx.Rngs(params=key))
    if config.features_checkpoint:
        from jaxreg.methods.features import copy_into, load_frozen

        _, nets = load_frozen(config.features_checkpoint, kind=f"deepsim_{config.feature_head}", ndim=config.ndim)
        copy_into(model.extractor, nets[0])
    return model


def features(model: DeepSim, images: Float[Array, "B *spatial 1"]) -> list:
    """The frozen extractor's three encoder feature maps of a batch (no gradient to its parameters)."""
    return frozen(model.extractor).encode(images)


def loss_fn(model: DeepSim, batch: dict, *, key) -> tuple[Float[Array, ""], dict]:
    """DeepSim training loss (eq. 1 with ``D = 1 - DeepSim``, eq. 5); returns ``(loss, aux)``.

    ``aux``: ``similarity`` (batch mean of ``D``, in [0, 2]), ``smoothness``
    (diffusion of the displacement, voxels), ``lam``.
    """
    cfg = model.config
    check_batch(batch, cfg)
    fixed, moving = batch["fixed"], batch["moving"]
    lam = sample_lambda(key, fixed.shape[0], low=cfg.lambda_range[0], high=cfg.lambda_range[1]) \
        if cfg.hyper else None
    _, disp, _ = model(fixed, moving, lam)
    warped = jax.vmap(warp)(moving, disp)
    target = batch.get("fixed_target", fixed)
    sim = 1.0 - jax.vmap(L.deepsim)(features(model, target), features(model, warped))
    reg = jax.vmap(L.diffusion)(disp)
    per = (1.0 - lam) * sim + lam * cfg.reg_scale * reg if cfg.hyper else sim + cfg.reg_weight * reg
    return jnp.mean(per), {"similarity": jnp.mean(sim), "smoothness": jnp.mean(reg), "lam": lam}


def register(model: DeepSim, fixed, moving, *, lam: float | None = None) -> Result:
    """Register with a trained DeepSim network (one forward pass); as :func:`jaxreg.methods.voxelmorph.register`."""
    return voxelmorph.register(model, fixed, moving, lam=lam)


# ----------------------------------------------------------------------------- io-deepsim

@nnx.jit
def _descriptor_stack(extractor: DeepSimNet, image):
    """Eq. 5's layers of one image as one full-resolution stack (see :func:`descriptors`)."""
    spatial = image.shape[:-1]
    pad = [(0, (-s) % 4) for s in spatial] + [(0, 0)]  # the extractor pools twice: sizes divisible by 4
    layers = frozen(extractor).encode(jnp.pad(image, pad)[None])
    out = []
    for f in layers:
        f = f[0]
        f = jax.image.resize(f, tuple(s + p for s, (_, p) in zip(spatial, pad)) + (f.shape[-1],), "linear")
        f = f[tuple(slice(0, s) for s in spatial)]
        norm = jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True))
        out.append(f / jnp.maximum(norm, 1e-6) / jnp.sqrt(float(len(layers))))
    return jnp.concatenate(out, axis=-1)


def descriptors(extractor: DeepSimNet, image) -> jnp.ndarray:
    """DeepSim's feature layers of one image as a descriptor stack for instance optimisation (``io-deepsim``).

    Each of the three encoder layers ``F^l`` (eq. 5) is resized linearly to
    the image grid, normalised to unit length per voxel and scaled by
    ``1/sqrt(3)``, then the layers are concatenated. The cosine of two such
    stacks at a voxel is therefore ``(1/3) sum_l cos(F^l(I), F^l(J))``, eq. 5's
    per-voxel term, so :func:`jaxreg.losses.cosine_similarity_loss` over them
    is ``-DeepSim`` at the image's resolution.

    Unlike the paper's network training (features of the warped image,
    ``F(I o Phi)``), instance optimisation warps the moving image's features
    (``F(I) o Phi``), as IO-DNS does with its descriptors: the extractor runs
    once per image instead of once per iteration.

    Args:
      extractor: a pretrained :class:`jaxreg.nn.DeepSimNet` (auto-encoder or
        segmentation head), e.g. from :func:`load_extractor`.
      image: ``(*spatial, 1)`` float image in [0, 1] (the extractor's
        training normalisation); any size (padded to a multiple of 4 inside).

    Returns:
      ``(*spatial, sum_l C_l)`` float32 (224 channels for the 3D widths
      32-64-128); unit length where the features are non-zero.

    Raises:
      ValueError: an image whose rank or channels do not match the extractor.
    """
    image = jnp.asarray(image, jnp.float32)
    if image.ndim != extractor.ndim + 1 or image.shape[-1] != 1:
        raise ValueError(f"DeepSim descriptors expect a (*spatial[{extractor.ndim}], 1) image, got {image.shape}")
    return _descriptor_stack(extractor, image)


def feature_fn(extractor: DeepSimNet):
    """``image -> descriptors`` for :func:`jaxreg.optimize.register_instance`'s ``feature_fn`` (``io-deepsim``)."""
    return lambda image: descriptors(extractor, image)


def load_extractor(run_dir) -> tuple[DeepSimNet, float]:
    """``(extractor, resolution_mm)``: the frozen DeepSim extractor of a run and the grid spacing it was trained on.

    Args:
      run_dir: a ``features`` pretraining run of kind ``deepsim_ae`` or
        ``deepsim_seg`` (``configs/deepsim_features_*.py``), or a trained
        ``deepsim`` registration run (its frozen extractor).

    Raises:
      FileNotFoundError: not a run directory. ValueError: a run of another method or kind.
    """
    import pathlib

    from jaxreg.io.checkpoint import load_trained, run_resolution
    from jaxreg.methods import restore_model
    from jaxreg.methods.features import frozen_nets

    run_cfg, params, _ = load_trained(pathlib.Path(run_dir))
    if run_cfg.get("method") == "deepsim":
        return restore_model(run_cfg, params)[1].extractor, run_resolution(run_cfg)
    try:
        _, nets = frozen_nets(run_dir, run_cfg, params, kind=("deepsim_ae", "deepsim_seg"))
    except ValueError as e:
        raise ValueError(f"{e}; io-deepsim needs a DeepSim extractor (configs/deepsim_features_*.py) "
                         "or a deepsim run") from None
    return nets[0], run_resolution(run_cfg)
