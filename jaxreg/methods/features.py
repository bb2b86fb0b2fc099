"""Pretraining of the frozen feature extractors of ContraReg and DeepSim (method ``features``).

``kind``:

* ``contrareg_ae``: one :class:`jaxreg.nn.ContraRegAutoencoder` per contrast
  (ContraReg, MICCAI 2022, Sec. 3 "Unsupervised pre-training": modality-specific
  autoencoders trained with an L1 + local NCC (window 7) reconstruction loss on
  crops with random flips and brightness/contrast augmentation);
* ``deepsim_ae``: one :class:`jaxreg.nn.DeepSimNet` auto-encoder (sigmoid
  output, mean squared error; DeepSim, MIDL 2021, Sec. 3 and 4) over all
  contrasts given;
* ``deepsim_seg``: the same network with a segmentation head (softmax
  cross-entropy over ``num_classes`` labels, background included).

Batches (``jaxreg.data.slices.SliceSource``): ``images`` ``(B, *spatial, K)``
float32 in [0, 1], the co-registered contrasts ``config.contrasts`` of one
slice (or crop), and ``labels`` ``(B, *spatial)`` int32 for ``deepsim_seg``.
Flips are drawn by the data source; brightness and contrast here.

After training, :func:`load_frozen` reads the extractor(s) of a run
directory for ``jaxreg.methods.contrareg`` / ``jaxreg.methods.deepsim``.
"""
from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float

from jaxreg import losses as L
from jaxreg.nn.features import CONTRAREG_AE_FEATURES, ContraRegAutoencoder, DeepSimNet

KINDS = ("contrareg_ae", "deepsim_ae", "deepsim_seg")


@dataclasses.dataclass(frozen=True)
class Config:
    """Feature-extractor pretraining.

    Attributes:
      ndim: 2 or 3.
      kind: one of ``KINDS``.
      contrasts: contrast names, the channels of ``batch["images"]``; one
        autoencoder each for ``contrareg_ae``.
      features: widths (default: ContraReg 32-64-128-64-32-32-32; DeepSim
        64-128-256 in 2D, 32-64-128 in 3D).
      num_classes: classes of ``deepsim_seg`` (background included).
      dropout: DeepSim's dropout rate (ours; the paper does not give it).
      lncc_window: window of ContraReg's local NCC term (Sec. 3: 7).
      brightness: additive brightness shift ``U(-b, b)`` (ContraReg Sec. 3; ours: 0.1).
      contrast_range: multiplicative contrast about the image mean ``U(lo, hi)`` (ours: 0.8-1.2).
    """

    ndim: int = 2
    kind: str = "contrareg_ae"
    contrasts: tuple = ("t1", "t2", "flair", "t1c")
    features: tuple = ()
    num_classes: int = 0
    dropout: float = 0.2
    lncc_window: int = 7
    brightness: float = 0.1
    contrast_range: tuple = (0.8, 1.2)

    def __post_init__(self):
        if self.ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {self.ndim}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.contrasts:
            raise ValueError("contrasts must name at least one contrast")
        if self.kind == "deepsim_seg" and self.num_classes < 2:
            raise ValueError(f"deepsim_seg needs num_classes >= 2, got {self.num_classes}")

    @property
    def hyper(self) -> bool:
        return False


class FeatureNets(nnx.Module):
    """The extractor(s) being pretrained: ``nets[k]`` for contrast ``k`` (ContraReg) or ``nets[0]`` (DeepSim)."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        self.config, self.ndim = config, config.ndim
        if config.kind == "contrareg_ae":
            feats = tuple(config.features) or CONTRAREG_AE_FEATURES
            nets = [ContraRegAutoencoder(config.ndim, 1, features=feats, rngs=rngs) for _ in config.contrasts]
        else:
            nets = [DeepSimNet(config.ndim, 1, features=tuple(config.features) or None, head=config.kind[8:],
                               out_channels=config.num_classes, dropout=config.dropout, rngs=rngs)]
        self.nets = nnx.List(nets)


def init(key, config: Config) -> FeatureNets:
    """Freshly initialised extractor(s) (deterministic for ``key``)."""
    return FeatureNets(config, rngs=nnx.Rngs(params=key))


def augment_intensity(config: Config, key, x: Float[Array, "B *spatial 1"]) -> Float[Array, "B *spatial 1"]:
    """Random brightness and contrast per image: ``(x - mean) * c + mean + b`` on the foreground (> 0)."""
    b = x.shape[0]
    kc, kb = jax.random.split(key)
    shape = (b,) + (1,) * (x.ndim - 1)
    c = jax.random.uniform(kc, shape, minval=config.contrast_range[0], maxval=config.contrast_range[1])
    br = jax.random.uniform(kb, shape, minval=-config.brightness, maxval=config.brightness)
    mean = jnp.mean(x, axis=tuple(range(1, x.ndim)), keepdims=True)
    return jnp.where(x > 0, (x - mean) * c + mean + br, 0.0)


def _check(batch, config):
    if "images" not in batch:
        raise ValueError(f"a features batch needs 'images', got keys {sorted(batch)}")
    x = batch["images"]
    if x.ndim != config.ndim + 2 or x.shape[-1] != len(config.contrasts):
        raise ValueError(f"batch['images'] must be (B, *spatial[{config.ndim}], {len(config.contrasts)}), got {x.shape}")
    if config.kind == "deepsim_seg" and "labels" not in batch:
        raise ValueError("deepsim_seg needs batch['labels']")


def loss_fn(model: FeatureNets, batch: dict, *, key) -> tuple[Float[Array, ""], dict]:
    """Pretraining loss of a batch; returns ``(loss, aux)``.

    ``contrareg_ae``: mean over contrasts of ``L1(x_hat, x) - LNCC_7(x, x_hat)``
    on brightness/contrast-augmented inputs ``x``; ``deepsim_ae``: MSE of the
    sigmoid reconstruction of every contrast; ``deepsim_seg``: softmax
    cross-entropy of the labels (one image per contrast, same labels).
    ``aux``: ``reconstruction`` (L1 or MSE) or ``cross_entropy``.
    """
    cfg = model.config
    _check(batch, cfg)
    images = batch["images"]
    k_aug, k_drop = jax.random.split(key)
    if cfg.kind == "contrareg_ae":
        total, l1s = 0.0, 0.0
        for k, net in enumerate(model.nets):
            x = augment_intensity(cfg, jax.random.fold_in(k_aug, k), images[..., k:k + 1])
            rec, _ = net(x)
            l1 = jnp.mean(jnp.abs(rec - x))
            ncc = jnp.mean(jax.vmap(lambda a, b: L.lncc(a, b, window=cfg.lncc_window))(x, rec))
            total, l1s = total + l1 + ncc, l1s + l1
        n = len(model.nets)
        return total / n, {"reconstruction": l1s / n}
    b, k_c = images.shape[0], images.shape[-1]
    x = jnp.moveaxis(images, -1, 1).reshape((b * k_c,) + images.shape[1:-1] + (1,))
    x = augment_intensity(cfg, k_aug, x)
    out, _ = model.nets[0](x, k_drop)
    if cfg.kind == "deepsim_ae":
        mse = jnp.mean(jnp.square(out - jnp.clip(x, 0.0, 1.0)))
        return mse, {"reconstruction": mse}
    labels = jnp.repeat(batch["labels"].astype(jnp.int32), k_c, axis=0)
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, labels))
    return ce, {"cross_entropy": ce}


def validate(model: FeatureNets, examples: list) -> dict:
    """Validation of unaugmented examples: ``val_reconstruction`` (L1 / MSE) or ``val_dice`` (seg, labels present)."""
    from jaxreg import metrics as M

    cfg = model.config
    errs, dices = [], []
    for ex in examples:
        x = jnp.asarray(ex["images"])[None]
        if cfg.kind == "contrareg_ae":
            for k, net in enumerate(model.nets):
                rec, _ = _apply(net, x[..., k:k + 1])
                errs.append(float(jnp.mean(jnp.abs(rec - x[..., k:k + 1]))))
            continue
        for k in range(x.shape[-1]):
            out, _ = _apply(model.nets[0], x[..., k:k + 1])
            if cfg.kind == "deepsim_ae":
                errs.append(float(jnp.mean(jnp.square(out - x[..., k:k + 1]))))
            else:
                pred = np.asarray(jnp.argmax(out[0], -1))
                dices.append(float(np.nanmean(M.dice(pred, np.asarray(ex["labels"])))))
    return {"val_reconstruction": float(np.mean(errs))} if errs else {"val_dice": float(np.mean(dices))}


@nnx.jit
def _apply(net, x):
    return net(x)


def load_frozen(run_dir, *, kind, contrasts=None, ndim: int | None = None) -> tuple[Config, list]:
    """``(config, nets)``: the pretrained extractor(s) of a ``features`` training run directory.

    Args:
      run_dir: ``--workdir`` of ``train.main --config configs/*_features_*.py``.
      kind: the expected ``Config.kind``, or a tuple of accepted kinds
        (``contrareg_ae`` also accepts a run whose contrasts include
        ``contrasts``, reordered to them).
      contrasts: for ``contrareg_ae``, the contrasts wanted, in order.
      ndim: the expected dimensionality.

    Returns:
      The run's :class:`Config` and the list of extractor modules (one per
      requested contrast, or one).

    Raises:
      FileNotFoundError: not a run directory. ValueError: a run of another
        kind or dimensionality, or missing contrasts.
    """
    from jaxreg.io.checkpoint import load_trained

    run_cfg, params, _ = load_trained(pathlib.Path(run_dir))
    return frozen_nets(run_dir, run_cfg, params, kind=kind, contrasts=contrasts, ndim=ndim)


def frozen_nets(run_dir, run_cfg: dict, params: dict, *, kind, contrasts=None,
                ndim: int | None = None) -> tuple[Config, list]:
    """:func:`load_frozen` on a run already read by :func:`jaxreg.io.load_trained` (``run_dir`` names it in errors)."""
    from jaxreg.methods import restore_model

    if run_cfg.get("method") != "features":
        raise ValueError(f"{run_dir} holds a {run_cfg.get('method')!r} run, not a 'features' pretraining run")
    _, model = restore_model(run_cfg, params)
    cfg = model.config
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if cfg.kind not in kinds:
        raise ValueError(f"{run_dir} pretrained {cfg.kind!r} features, expected {' or '.join(map(repr, kinds))}")
    if ndim is not None and cfg.ndim != ndim:
        raise ValueError(f"{run_dir} holds {cfg.ndim}D features, expected {ndim}D")
    if cfg.kind != "contrareg_ae":
        return cfg, [model.nets[0]]
    missing = [c for c in contrasts if c not in cfg.contrasts]
    if missing:
        raise ValueError(f"{run_dir} has no autoencoder for contrasts {missing} (it has {list(cfg.contrasts)})")
    return cfg, [model.nets[list(cfg.contrasts).index(c)] for c in contrasts]


def frozen(module: nnx.Module) -> nnx.Module:
    """A copy of ``module`` whose parameters pass no gradient (``stop_gradient``; inputs still do)."""
    gd, st = nnx.split(module)
    return nnx.merge(gd, jax.lax.stop_gradient(st))


def copy_into(target: nnx.Module, source: nnx.Module) -> None:
    """Copy the parameters of ``source`` into ``target`` (same architecture).

    Raises:
      ValueError: different parameter shapes.
    """
    t, s = nnx.state(target), nnx.state(source)
    ts = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(t))
    ss = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(s))
    if ts != ss:
        raise ValueError("the pretrained extractor does not match the configured architecture")
    nnx.update(target, s)
