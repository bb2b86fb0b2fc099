"""DNS / MASR-Net: modality-agnostic deep structural image representations (DSIR) for registration.

``Config``, ``init``, ``loss_fn`` (anatomy-aware contrastive learning),
``descriptors`` (the DSIR of an image, for instance optimisation) and
``register`` (IO-DNS: :func:`jaxreg.optimize.register_instance` with the
``dns`` similarity on these descriptors).

References:
  Mok, Li, Bai, Zhang, Liu, Zhou, Yan, Jin, Shi, Yin, Lu, Zhang,
  "Modality-Agnostic Structural Image Representation Learning for Deformable
  Multi-Modality Medical Image Registration", CVPR 2024: Sec. 3.2 (MASR-Net,
  DNS, feature squeezing), Sec. 3.3 (Bezier intensity transform with
  inversion, InfoNCE eq. 4), Sec. 3.4 (eq. 5: negated cosine similarity of
  Gaussian-smoothed DSIRs), Sec. 4.2 (N^k = 8196, tau = 0.07, n = 3,
  delta = 0.5, C_d = 24, Adam 1e-4, batch 1), supplementary Table 4 (IO).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreg.augment import random_bezier
from jaxreg.losses import infonce, sample_in_mask
from jaxreg.nn.masr import MASR_DEC, MASR_ENC, MASRNet


@dataclasses.dataclass(frozen=True)
class Config:
    """MASR-Net and its contrastive training (defaults cite DNS, CVPR 2024).

    Attributes:
      ndim: 2 or 3.
      enc_features, dec_features: backbone widths (ours; the paper's Fig. 5
        is not available as text); ``dec_features[-1]`` is ``C_h``.
      dilations: DNS layouts, ``(1, 2)`` = direct + dilated 6-NH (Sec. 3.2,
        "duo layout", Table 5); ``(1,)`` single layout.
      squeeze_hidden: hidden width of the squeezing head (ours).
      out_channels: ``C_d`` = 24 (Sec. 4.2).
      use_dns: False = "MASR-Net w/o DNS" (Table 5).
      temperature: InfoNCE ``tau`` = 0.07 (Sec. 4.2).
      num_samples: sampled feature vectors ``N^k`` = 8196 (Sec. 4.2).
      bezier_points: Bezier control points ``n + 1`` = 4 (Sec. 4.2: n = 3).
      invert_prob: intensity inversion threshold ``delta`` = 0.5 (Sec. 4.2).
      bezier_views: Bezier-augment the second view of co-registered
        multi-contrast pairs too (probability; a single image with itself is
        always augmented, as the paper's ``I`` vs ``I'``). Ours: 0.5.
      mask_threshold: foreground (either view > threshold before
        augmentation) where the vectors are sampled (Sec. 3.3: "x sampled in
        the foreground of I").
    """

    ndim: int = 3
    enc_features: tuple = MASR_ENC
    dec_features: tuple = MASR_DEC
    dilations: tuple = (1, 2)
    squeeze_hidden: int = 8
    out_channels: int = 24
    use_dns: bool = True
    temperature: float = 0.07
    num_samples: int = 8196
    bezier_points: int = 4
    invert_prob: float = 0.5
    bezier_views: float = 0.5
    mask_threshold: float = 0.05


def init(key, config: Config) -> MASRNet:
    """A MASR-Net with parameters drawn from ``key`` (untrained: the paper's random-initialisation ablation)."""
    model = MASRNet(config.ndim, 1, enc_features=tuple(config.enc_features),
                    dec_features=tuple(config.dec_features), dilations=tuple(config.dilations),
                    squeeze_hidden=config.squeeze_hidden, out_channels=config.out_channels,
                    use_dns=config.use_dns, rngs=nnx.Rngs(params=key))
    model.config = config  # static: the loss reads its hyperparameters here
    return model


def _maybe_bezier(key, x, use, cfg: Config):
    """Bezier-remap (DNS eq. 3) the examples of a ``(B, *spatial, 1)`` batch where ``use`` is True."""
    aug = functools.partial(random_bezier, num_points=cfg.bezier_points, invert_prob=cfg.invert_prob)
    out = jax.vmap(aug)(jax.random.split(key, x.shape[0]), x)
    return jnp.where(use.reshape((x.shape[0],) + (1,) * (x.ndim - 1)), out, x)


def _contrast(da, db, mask, key, *, num_samples: int, temperature: float):
    """``(InfoNCE, top-1 retrieval)`` of one pair of DSIRs at ``num_samples`` locations drawn in ``mask``."""
    pts, w = sample_in_mask(key, mask, num_samples)
    idx = tuple(pts[:, i] for i in range(pts.shape[1]))
    q, kv = da[idx], db[idx]
    loss = infonce(q, kv, temperature=temperature, weights=w)
    best = jnp.argmax(jnp.where(w[None] > 0, q @ kv.T, -jnp.inf), -1)
    top1 = jnp.sum(w * (best == jnp.arange(len(w)))) / jnp.maximum(jnp.sum(w), 1.0)
    return loss, top1


def loss_fn(model: MASRNet, batch: dict, *, key):
    """Anatomy-aware contrastive loss (DNS eq. 4) of a batch of co-registered view pairs.

    Args:
      model: :class:`jaxreg.nn.MASRNet`.
      batch: ``fixed``, ``moving`` ``(B, *spatial, 1)`` views in [0, 1], in
        voxel correspondence; optional ``same`` ``(B,)`` (1: the views are
        one image, whose second copy is then always Bezier-augmented).
      key: PRNG key (augmentation and sampling).

    Hyperparameters come from ``model.config`` (set by :func:`init`).

    Returns:
      ``(loss, aux)``: scalar mean InfoNCE over the batch; aux has
      ``similarity`` (= the loss), ``smoothness`` (0; the training stack's
      log layout) and ``top1`` (fraction of queries whose most similar key
      is their positive).
    """
    cfg = getattr(model, "config", None) or Config()
    a, b = batch["fixed"], batch["moving"]
    bsz = a.shape[0]
    same = batch.get("same", jnp.zeros((bsz,), jnp.float32))
    k_aug, k_use, k_aug_a, k_use_a, k_smp = jax.random.split(key, 5)
    # the second view: always remapped when it is the same image, else with probability bezier_views;
    # the first view of a co-registered pair is remapped with the same probability
    b_in = _maybe_bezier(k_aug, b, (same > 0) | (jax.random.uniform(k_use, (bsz,)) < cfg.bezier_views), cfg)
    a_in = _maybe_bezier(k_aug_a, a, (same <= 0) & (jax.random.uniform(k_use_a, (bsz,)) < cfg.bezier_views), cfg)
    mask = (jnp.maximum(a[..., 0], b[..., 0]) > cfg.mask_threshold)
    da, db = model(a_in), model(b_in)
    one = functools.partial(_contrast, num_samples=cfg.num_samples, temperature=cfg.temperature)
    losses, top1 = jax.vmap(one)(da, db, mask, jax.random.split(k_smp, bsz))
    loss = jnp.mean(losses)
    return loss, {"similarity": loss, "smoothness": jnp.zeros(()), "top1": jnp.mean(top1)}


def descriptors(model: MASRNet, image) -> jnp.ndarray:
    """The DSIR of one image: ``(*spatial, 1)`` float in [0, 1] -> ``(*spatial, C_d)`` float32 (jitted).

    Raises:
      ValueError: an image whose rank does not match the model.
    """
    from jaxreg.methods import forward_one

    return forward_one(model, image, "descriptors")


def feature_fn(model: MASRNet):
    """``image -> DSIR`` for :func:`jaxreg.optimize.register_instance`'s ``feature_fn``."""
    return lambda image: descriptors(model, image)


def validate(model: MASRNet, examples: list, *, num_samples: int = 4096, temperature: float = 0.07) -> dict:
    """InfoNCE and top-1 retrieval of held-out co-registered pairs (whole volumes, no augmentation).

    The same ``num_samples`` foreground locations (seed 0) are drawn per pair,
    so values are comparable across checkpoints. Returns ``val_infonce``,
    ``val_top1`` (means over the examples) and per-pair rows.
    """
    rows = []
    for ex in examples:
        a, b = jnp.asarray(ex["fixed"]), jnp.asarray(ex["moving"])
        da, db = descriptors(model, a), descriptors(model, b)
        mask = jnp.maximum(a[..., 0], b[..., 0]) > 0.05
        loss, top1 = (float(v) for v in _contrast(da, db, mask, jax.random.key(0), num_samples=num_samples,
                                                   temperature=temperature))
        rows.append({"name": ex["name"], "infonce": loss, "top1": top1})
    return {"val_infonce": float(np.mean([r["infonce"] for r in rows])),
            "val_top1": float(np.mean([r["top1"] for r in rows])), "val_pairs": rows}


def register(model: MASRNet, fixed, moving, *, config=None, **kwargs):
    """IO-DNS on one pair already on the same grid: :func:`jaxreg.optimize.register_instance` with ``similarity='dns'``.

    Args:
      model: trained (or random, for the ablation) MASR-Net.
      fixed, moving: ``(*spatial, 1)`` images on one grid.
      config: an :class:`jaxreg.optimize.InstanceConfig` with ``similarity='dns'``
        (default: :data:`jaxreg.optimize.DNS_CONFIG`).
      kwargs: passed to ``register_instance`` (mask, init_matrix, progress).

    Returns:
      :class:`jaxreg.optimize.InstanceResult`.
    """
    from jaxreg.optimize import DNS_CONFIG, register_instance

    return register_instance(fixed, moving, config=config or DNS_CONFIG, feature_fn=feature_fn(model), **kwargs)
