"""ContraReg: a registration network trained by PatchNCE on frozen modality-specific autoencoder features.

Source: Dey, Schlemper, Salehi, Zhou, Gerig, Sofka, "ContraReg: Contrastive
Learning of Multi-modality Unsupervised Deformable Image Registration",
MICCAI 2022 (../shared/papers/contrareg_dey2022.md). No official code exists;
where the paper is silent the choice is ours and says so.

* Network (Sec. 3 "Registration training"): a VoxelMorph-style U-Net predicts a
  stationary velocity ``v``; ``phi = exp(v)`` and ``phi^-1 = exp(-v)`` by
  scaling and squaring (bidirectional). The U-Net is
  :class:`jaxreg.methods.voxelmorph.VoxelMorph`, so every baseline of the
  comparison runs the same network.
* Similarity (Sec. 3, equation of ``d_12``): features of the first 6 layers of
  the frozen autoencoders ``A_1`` (fixed contrast) and ``A_2`` (moving
  contrast) of ``I_1`` and ``I_2 o phi``, projected per layer by 3-layer
  256-wide ReLU MLPs ``F_1^k``, ``F_2^k`` onto the unit sphere, PatchNCE with
  one positive (the same location) and ``ns = 1024`` negatives, ``tau =
  0.007`` (Sec. 4). ``L_sim = (d_12(I_1 || I_2 o phi) + d_21(I_2 || I_1 o
  phi^-1)) / 2``. mCR samples only inside the union of the two foregrounds,
  resized to each layer.
* Objective (Sec. 3 "Hypernetwork optimization", Sec. 4): ``alpha (1 - lambda)
  L_sim + lambda L_reg`` with ``alpha = 0.1``, ``L_reg`` the smoothness of
  the velocity (the paper writes ``||v||^2`` and calls it a smoothness term;
  here the diffusion ``mean |grad v|^2`` in voxels), lambda ~ U[0, 1] per
  example, FiLM hypernetwork (4-layer 128-wide ReLU MLP,
  :class:`jaxreg.nn.HyperFiLM`), trained jointly with the MLPs.

Several contrasts: the model holds one autoencoder and one set of MLPs per
entry of ``Config.contrasts``; a batch carries ``fixed_contrast`` and
``moving_contrast`` ``(B,)`` int32 indices into them and must hold one
contrast pair (``jaxreg.data.PairSource(contrast_block=batch_size)``): the
first example's indices select the extractors (``lax.switch``).

API (docs/design.md "Methods"): :class:`Config`, :func:`init`,
:func:`loss_fn`, :func:`register` (one forward pass, any contrasts).
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
from jaxreg.nn.features import CONTRAREG_AE_FEATURES, ContraRegAutoencoder
from jaxreg.spatial import warp


@dataclasses.dataclass(frozen=True)
class Config:
    """ContraReg model and loss (defaults: the paper's, Sec. 3 and 4, unless marked ours).

    Attributes:
      ndim, in_channels: 2 or 3; 1.
      enc_features, dec_features, final_features, out_level, int_steps,
        int_downsize: the registration U-Net (:class:`jaxreg.methods.voxelmorph.Config`;
        the paper: constant width ch = 64, ts = 5 integration steps).
      contrasts: contrasts with an autoencoder, in the order of the batch's
        contrast indices.
      features_checkpoint: a ``features`` run (``kind="contrareg_ae"``) with
        these contrasts, read by :func:`init`; "" = randomly initialised
        frozen autoencoders (the paper's "+RandAE" ablation, Table 1 C6).
      ae_features: autoencoder filters (Sec. 4: 32-64-128-64-32-32-32).
      num_feature_layers: layers sampled (Sec. 4: the first 6).
      mlp_features, mlp_layers: projection MLPs (Sec. 3: 3 layers, 256 wide).
      num_samples: sampled locations per layer, the positive and ``ns``
        negatives (Sec. 4: ns = 1024).
      temperature: PatchNCE ``tau`` (Sec. 4: 0.007).
      masked: mCR (True) or CR (False).
      mask_threshold: foreground of an image in [0, 1] (ours: > 0.05; our
        data are skull-stripped, background 0).
      alpha: rescaling of ``L_sim`` (Sec. 4: 0.1).
      hyper: lambda-conditioned (the paper: always).
      lambda_range: lambda ~ U[low, high] (Sec. 3: [0, 1]).
      reg_weight: smoothness weight when not ``hyper``.
    """

    ndim: int = 2
    in_channels: int = 1
    enc_features: tuple = (64, 64, 64, 64)
    dec_features: tuple = (64, 64, 64, 64)
    final_features: tuple = (64, 64, 64)
    out_level: int = 0
    int_steps: int = 5
    int_downsize: int = 2
    contrasts: tuple = ("t1", "t2", "flair", "t1c")
    features_checkpoint: str = ""
    ae_features: tuple = CONTRAREG_AE_FEATURES
    num_feature_layers: int = 6
    mlp_features: int = 256
    mlp_layers: int = 3
    num_samples: int = 1024
    temperature: float = 0.007
    masked: bool = True
    mask_threshold: float = 0.05
    alpha: float = 0.1
    hyper: bool = True
    lambda_range: tuple = (0.0, 1.0)
    reg_weight: float = 1.0

    def __post_init__(self):
        if self.ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {self.ndim}")
        if not self.contrasts:
            raise ValueError("contrasts must name at least one contrast")
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (a positive and a negative), got {self.num_samples}")
        if self.temperature <= 0 or self.alpha <= 0:
            raise ValueError(f"temperature and alpha must be > 0, got {self.temperature}, {self.alpha}")
        if self.mlp_layers < 1:
            raise ValueError(f"mlp_layers must be >= 1, got {self.mlp_layers}")
        if len(self.lambda_range) != 2 or not 0.0 <= self.lambda_range[0] <= self.lambda_range[1] <= 1.0:
            raise ValueError(f"lambda_range must be (low, high) in [0, 1], got {self.lambda_range}")

    @property
    def similarity(self) -> str:
        return "mcr" if self.masked else "cr"

    def network_config(self) -> voxelmorph.Config:
        """The registration network's :class:`jaxreg.methods.voxelmorph.Config` (bidirectional SVF)."""
        return voxelmorph.Config(ndim=self.ndim, in_channels=self.in_channels, enc_features=self.enc_features,
                                 dec_features=self.dec_features, final_features=self.final_features,
                                 out_level=self.out_level, int_steps=self.int_steps, int_downsize=self.int_downsize,
                                 bidirectional=True, hyper=self.hyper, lambda_range=self.lambda_range)


class MLP(nnx.Module):
    """``(N, C) -> (N, F)``: ``layers`` linear layers with ReLU between them (ContraReg's ``F^k``)."""

    def __init__(self, in_features: int, features: int, layers: int, *, rngs: nnx.Rngs):
        dims = [in_features] + [features] * layers
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


class ContraReg(nnx.Module):
    """Registration network + frozen autoencoders + projection MLPs (one set per contrast)."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        self.config, self.ndim = config, config.ndim
        self.reg = voxelmorph.VoxelMorph(config.network_config(), rngs=rngs)
        self.aes = nnx.List([ContraRegAutoencoder(config.ndim, 1, features=config.ae_features,
                                                  num_feature_layers=config.num_feature_layers, rngs=rngs)
                             for _ in config.contrasts])
        widths = self.aes[0].layer_features
        self.mlps = nnx.List([nnx.List([MLP(w, config.mlp_features, config.mlp_layers, rngs=rngs) for w in widths])
                              for _ in config.contrasts])

    def __call__(self, fixed, moving, lam=None, *, inverse: bool | None = None):
        """``(velocity, disp, inverse_disp)`` of the registration network (see :class:`voxelmorph.VoxelMorph`)."""
        return self.reg(fixed, moving, lam, inverse=inverse)


def init(key, config: Config) -> ContraReg:
    """A fresh :class:`ContraReg`; the autoencoders come from ``config.features_checkpoint`` when set.

    Raises:
      FileNotFoundError / ValueError: the feature run is missing, of another
        kind or dimensionality, lacks a contrast, or its autoencoders have
        other widths.
    """
    model = ContraReg(config, rngs=nnx.Rngs(params=key))
    if config.features_checkpoint:
        from jaxreg.methods.features import copy_into, load_frozen

        _, nets = load_frozen(config.features_checkpoint, kind="contrareg_ae", contrasts=config.contrasts,
                              ndim=config.ndim)
        for ae, net in zip(model.aes, nets):
            copy_into(ae, net)
    return model


def _switch(index, modules, fn, *args):
    """``fn(modules[index], *args)`` for a traced scalar ``index`` (one branch runs; frozen = no gradient)."""
    if len(modules) == 1:
        return fn(modules[0], *args)
    branches = []
    for mod in modules:
        gd, st = nnx.split(mod)
        branches.append(lambda *a, gd=gd, st=st: fn(nnx.merge(gd, st), *a))
    return jax.lax.switch(jnp.clip(index, 0, len(modules) - 1), branches, *args)


def features(model: ContraReg, contrast, images: Float[Array, "B *spatial 1"]) -> list:
    """The frozen autoencoder features (6 layers) of a batch of one contrast (index ``contrast``).

    The autoencoders' parameters get no gradient (``stop_gradient``); the images do.
    """
    return _switch(contrast, list(model.aes), lambda ae, x: frozen(ae).encode(x), images)


def project(model: ContraReg, contrast, layer: int, vectors: Float[Array, "N C"]) -> Float[Array, "N F"]:
    """``F^layer`` of contrast index ``contrast`` applied to sampled feature vectors."""
    return _switch(contrast, [m[layer] for m in model.mlps], lambda mlp, v: mlp(v), vectors)


def contrastive_distance(model: ContraReg, key, query_layers, query_contrast, key_layers, key_contrast,
                         mask=None) -> Float[Array, " B"]:
    """``d(I_q || I_k)`` per example: PatchNCE of the query features against the key features (Sec. 3).

    ``query_layers`` / ``key_layers``: lists of ``(B, *spatial_k, C_k)``; ``mask``: ``(B, *spatial)`` or None.
    """
    cfg = model.config
    n = len(query_layers)
    projections = [(lambda v, k=k: project(model, query_contrast, k, v),
                    lambda v, k=k: project(model, key_contrast, k, v)) for k in range(n)]
    b = query_layers[0].shape[0]
    keys = jax.random.split(key, b)

    def one(kk, q, kv, m):
        return L.patchnce(q, kv, kk, num_samples=cfg.num_samples, temperature=cfg.temperature, mask=m,
                          projections=projections)

    if mask is None:
        return jax.vmap(lambda kk, q, kv: one(kk, q, kv, None))(keys, query_layers, key_layers)
    return jax.vmap(one)(keys, query_layers, key_layers, mask)


def _contrast_indices(batch, config):
    """``(fixed_index, moving_index)`` scalars of a batch (default: contrasts 0 and 1, or 0 and 0)."""
    default_m = 1 if len(config.contrasts) > 1 else 0
    f = batch.get("fixed_contrast")
    m = batch.get("moving_contrast")
    f = jnp.asarray(0, jnp.int32) if f is None else jnp.asarray(f, jnp.int32).reshape(-1)[0]
    m = jnp.asarray(default_m, jnp.int32) if m is None else jnp.asarray(m, jnp.int32).reshape(-1)[0]
    return f, m


def loss_fn(model: ContraReg, batch: dict, *, key) -> tuple[Float[Array, ""], dict]:
    """ContraReg training loss of a batch (Sec. 3); returns ``(loss, aux)``.

    ``loss = mean_b [alpha (1 - lam_b) L_sim + lam_b L_reg]`` (``hyper``) or
    ``alpha L_sim + reg_weight L_reg``; ``L_sim = (d_12 + d_21) / 2``, each a
    PatchNCE over the sampled layers (about ``log num_samples`` at chance);
    ``L_reg`` = diffusion of the velocity (voxels). ``aux``: ``similarity``
    (batch mean of ``L_sim``), ``smoothness``, ``lam``.

    Raises:
      ValueError: missing keys or mismatched shapes (at trace time).
    """
    cfg = model.config
    check_batch(batch, cfg)
    fixed, moving = batch["fixed"], batch["moving"]
    cf, cm = _contrast_indices(batch, cfg)
    k_lam, k12, k21 = jax.random.split(key, 3)
    lam = sample_lambda(k_lam, fixed.shape[0], low=cfg.lambda_range[0], high=cfg.lambda_range[1]) \
        if cfg.hyper else None
    v, disp, inv = model(fixed, moving, lam, inverse=True)
    warped_m = jax.vmap(warp)(moving, disp)
    warped_f = jax.vmap(warp)(fixed, inv)
    mask12 = mask21 = None
    if cfg.masked:
        fg = lambda x: jnp.mean(x, axis=-1) > cfg.mask_threshold  # noqa: E731
        mask12 = jax.lax.stop_gradient((fg(fixed) | fg(warped_m)).astype(jnp.float32))
        mask21 = jax.lax.stop_gradient((fg(moving) | fg(warped_f)).astype(jnp.float32))
    d12 = contrastive_distance(model, k12, features(model, cf, fixed), cf, features(model, cm, warped_m), cm, mask12)
    d21 = contrastive_distance(model, k21, features(model, cm, moving), cm, features(model, cf, warped_f), cf, mask21)
    sim = 0.5 * (d12 + d21)
    reg = jax.vmap(L.diffusion)(v)
    per = cfg.alpha * (1.0 - lam) * sim + lam * reg if cfg.hyper else cfg.alpha * sim + cfg.reg_weight * reg
    return jnp.mean(per), {"similarity": jnp.mean(sim), "smoothness": jnp.mean(reg), "lam": lam}


def register(model: ContraReg, fixed, moving, *, lam: float | None = None) -> Result:
    """Register ``moving`` to ``fixed`` with a trained ContraReg network (one forward pass, any contrasts).

    Inputs, outputs and errors as :func:`jaxreg.methods.voxelmorph.register`:
    ``(B, *spatial, 1)`` or unbatched float32 images in [0, 1] on one grid,
    sizes divisible by ``2 ** len(enc_features)``; ``lam`` in [0, 1] is
    required for a lambda-conditioned model. Returns a
    :class:`jaxreg.methods.voxelmorph.Result` (voxel displacements).
    """
    return voxelmorph.register(model, fixed, moving, lam=lam)
