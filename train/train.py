"""``train_and_evaluate``: sharded, resumable training of a registration method.

One jitted train step (``jax.jit`` with NamedShardings: batch split over the
``'data'`` mesh axis, state replicated; the state buffer is donated) runs
Optax updates on the pure state pytree ``{params, opt_state, step, key}``;
the Flax NNX model is split into ``(graphdef, params)`` once. Orbax keeps
checkpoints (state + grain iterator position) under ``WORKDIR/checkpoints``;
re-running on the same WORKDIR resumes from the latest one exactly. Every
logged step appends a JSON object to ``WORKDIR/metrics.jsonl`` (and to
TensorBoard under ``WORKDIR/tb``); validation adds ``val_*`` entries and a QC
image under ``WORKDIR/qc``.
"""
from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jaxreg import metrics as M
from jaxreg.data import PairSource, fixed_pairs, load_subjects, make_dataset, read_manifest, write_manifest
from jaxreg.data.manifest import Subject
from jaxreg.methods import method_config
from jaxreg.spatial import warp, warp_labels
from train import parallel
from train.checkpoint import Checkpointer, abstract_like

# ----------------------------------------------------------------------------- data

def builtin_manifest(source: str, root, workdir: pathlib.Path) -> pathlib.Path:
    """Write a manifest for a folder of ``../shared/data`` (``ixi`` or ``brats_space``) into ``workdir``."""
    root = pathlib.Path(root)
    if source == "ixi":
        ids = sorted(p.name[: -len("_t1.nii.gz")] for p in (root / "ixi").glob("*_t1.nii.gz"))
        subjects = [Subject(i, {"t1": root / "ixi" / f"{i}_t1.nii.gz"},
                            (root / "ixi" / f"{i}_labels.nii.gz") if (root / "ixi" / f"{i}_labels.nii.gz").is_file()
                            else None) for i in ids]
    elif source == "brats_space":
        subjects = []
        for d in sorted(p for p in (root / "brats_space").iterdir() if p.is_dir()):
            seg = d / "tumor_seg.nii.gz"
            subjects.append(Subject(d.name, {c: d / f"{c}.nii.gz" for c in ("t1", "t2", "flair", "t1c")},
                                    seg if seg.is_file() else None))
    else:
        raise ValueError(f"unknown data source {source!r} (use 'ixi', 'brats_space' or a manifest path)")
    if not subjects:
        raise FileNotFoundError(f"no {source} subjects under {root}")
    workdir.mkdir(parents=True, exist_ok=True)
    return write_manifest(workdir / f"manifest_{source}.csv", subjects)


def _split(spec: str, n: int) -> list[int]:
    a, b = (int(x) if x else None for x in spec.split(":"))
    return list(range(n))[slice(a, b)]


def _axis(d):
    a = d.get("slice_axis", -1)
    return None if a is None or a < 0 else int(a)


def build_view_data(config):
    """``(ViewSource, val_examples, None)`` for representation learning (``config.data.kind == 'views'``).

    ``data.train_cases`` / ``data.val_cases`` name cases of ``data.root``
    (:func:`jaxreg.data.views.shared_data_subjects`); validation examples are
    whole co-registered volumes: every other contrast against the first, and
    for single-contrast cases the image against its ``sin`` remap.
    """
    from jaxreg.data.pipeline import sin_remap
    from jaxreg.data.views import ViewSource, load_view_subject, shared_data_subjects

    d = config.data
    load = lambda names: [load_view_subject(n, p, resolution=d.resolution)
                          for n, p in shared_data_subjects(d.root, names).items()]
    source = ViewSource(load(d.train_cases), crop=tuple(d.crop), seed=config.seed, same_prob=d.same_prob,
                        flip=d.flip)
    val = []
    for s in load(d.val_cases):
        names = list(s.images)
        first = s.images[names[0]][..., None]
        others = [(c, s.images[c][..., None]) for c in names[1:]] or [("sin", sin_remap(first))]
        for c, img in others:
            val.append({"fixed": first, "moving": img.astype(np.float32), "name": f"{s.name} {names[0]}-{c}"})
    return source, val, None


def build_keymorph_data(config):
    """``(KeyMorphSource, val_examples, None)`` for KeyMorph (``config.data.kind == 'keymorph'``).

    ``data.labelled_cases`` (IXI ids with labels), ``data.multi_cases``
    (multi-contrast cases of ``data.root``) and ``data.val_cases`` (IXI ids)
    are loaded onto their input cubes; labels are remapped with one table
    over the labelled and validation subjects. Validation: the ordered pairs
    of ``val_cases``, each with its moving scan also rotated in its header by
    ``data.val_rotation`` degrees about a random axis (seed 0) for the
    keypoint repeatability.
    """
    from jaxreg.data.keymorph import (KeyMorphSource, label_table, load_cube_subject, remap_labels, rotate_header,
                                      rotation_about_axis, to_cube)
    from jaxreg.data.views import shared_data_subjects
    from jaxreg.io import Volume
    from jaxreg.methods.keymorph import canonical_grid

    d, m = config.data, config.model
    grid, spacing = tuple(m.grid), float(m.spacing)
    root = pathlib.Path(d.root)

    def ixi(i):
        return load_cube_subject(i, {"t1": root / "ixi" / f"{i}_t1.nii.gz"}, grid=grid, spacing=spacing,
                                 labels_path=root / "ixi" / f"{i}_labels.nii.gz")

    labelled, val_subjects = [ixi(i) for i in d.labelled_cases], [ixi(i) for i in d.val_cases]
    table = label_table([s.label_values for s in labelled + val_subjects])
    if len(table) + 1 != m.num_labels:
        raise ValueError(f"the label maps hold {len(table)} labels; set model.num_labels = {len(table) + 1}")
    for s in labelled + val_subjects:
        s.labels = remap_labels(s.labels, table)
    multi = [load_cube_subject(n, p, grid=grid, spacing=spacing)
             for n, p in shared_data_subjects(d.root, d.multi_cases).items()]
    source = KeyMorphSource(labelled, multi, pretrain_examples=d.pretrain_steps * config.batch_size,
                            consistency_prob=d.consistency_prob, pretrain_multi=d.get("pretrain_multi", False),
                            pretrain_always=d.get("pretrain_always", False),
                            seed=config.seed)
    val, rng = [], np.random.default_rng(0)
    for fi, f in enumerate(val_subjects):
        for mi, mv in enumerate(val_subjects):
            if fi == mi:
                continue
            vol = mv.source
            rot = rotation_about_axis(rng.normal(size=3), d.val_rotation)
            centre = mv.affine[:3, :3] @ ((np.asarray(grid) - 1) / 2) + mv.affine[:3, 3]
            rvol = Volume(vol.data, rotate_header(vol.affine, rot, centre))
            cube_r = canonical_grid(rvol.data, rvol.affine, grid=grid, spacing=spacing)
            # rotated-cube voxel -> original-cube voxel: original world = R^-1 (world' - c) + c
            back = np.linalg.inv(mv.affine) @ np.linalg.inv(rotate_header(np.eye(4), rot, centre)) @ cube_r
            val.append({"fixed": f.images["t1"][..., None], "moving": mv.images["t1"][..., None],
                        "fixed_labels": f.labels, "moving_labels": mv.labels, "name": f"{mv.name}->{f.name}",
                        "moving_rotated": to_cube(rvol, cube_r, grid)[..., None], "rotation": back})
    return source, val, None


def car_examples(subjects, data, *, num_slices: int, seed: int = 0) -> list:
    """CAR's evaluation pairs: known deformations of every contrast of ``data.test_cases``, IXI label pairs.

    ``subjects`` holds the test cases and then the labelled IXI cases
    (``data.label_cases``). Known-deformation pairs:
    :func:`jaxreg.data.car.known_deformation_examples` (``contrast`` names
    the moving contrast; fixed is the T1). Label pairs: each ordered pair of
    the labelled cases, mono-contrast and with the fixed image ``sin``
    remapped (an unseen synthetic contrast), ``num_slices`` slices each (or
    the whole volume in 3D), for Dice over the labels present.
    """
    from jaxreg.data.car import central_slices, known_deformation_examples
    from jaxreg.data.pipeline import sin_remap

    axis = _axis(data)
    tests = [s for s in subjects if s.labels is None]
    labelled = [s for s in subjects if s.labels is not None]
    out = known_deformation_examples(tests, num_slices=num_slices, deform_voxels=data.deform_voxels,
                                     deform_spacing=data.deform_spacing, seed=seed, axis=axis)
    for fs in labelled:
        for ms in labelled:
            if fs is ms:
                continue
            ks = central_slices(fs.images["t1"], num_slices, axis=axis) if axis is not None else [None]
            for k in ks:
                take = (lambda a: np.take(a, k, axis=axis)) if axis is not None else (lambda a: a)  # noqa: E731
                f, m = np.array(take(fs.images["t1"]), np.float32), np.array(take(ms.images["t1"]), np.float32)
                for contrast, fixed in (("t1", f), ("sin", sin_remap(f))):
                    out.append({"fixed": fixed, "moving": m, "fixed_labels": take(fs.labels),
                                "moving_labels": take(ms.labels), "contrast": f"t1->{contrast}",
                                "case": f"{ms.name}->{fs.name}",
                                "name": f"{ms.name}->{fs.name} t1->{contrast}" + (f" slice {k}" if k is not None else "")})
    return out


def load_car_subjects(config):
    """``(train_subjects, eval_subjects, grid)`` of a CAR config (T1 only for training)."""
    from jaxreg.data.car import load_brain_subjects

    d = config.data
    names = list(d.train_cases) + list(d.test_cases) + list(d.label_cases)
    loaded, shape, affine = load_brain_subjects(d.root, names, resolution=d.resolution,
                                                multiple=2 ** len(config.model.enc_features),
                                                crop=tuple(d.crop) or None)
    train = loaded[:len(d.train_cases)]
    for s in train:
        s.images, s.labels = {"t1": s.images["t1"]}, None
    return train, loaded[len(d.train_cases):], (shape, affine)


def build_car_data(config):
    """``(PairSource, val_examples, grid)`` for CAR and its baselines (``config.data.kind == 'car'``).

    Training: T1 pairs of ``data.train_cases`` (``data.mode``: ``inter``,
    two subjects, or ``self``, one image and its deformed copy; random slices
    along ``data.slice_axis`` in 2D) with random smooth deformations. Validation:
    :func:`car_examples` with ``data.num_val`` slices.
    """
    d = config.data
    train, evals, grid = load_car_subjects(config)
    source = PairSource(train, mode=d.mode, fixed_contrast="t1", moving_contrast="t1", seed=config.seed,
                        deform_voxels=d.deform_voxels, deform_spacing=d.deform_spacing,
                        deform_fixed=d.deform_fixed, slice_axis=_axis(d), flip=d.flip)
    return source, car_examples(evals, d, num_slices=d.num_val), grid


def _label_table_remap(subjects):
    """Remap every subject's labels onto ``1..K`` with one table (IXI's 148 DLMUSE values); returns K + 1."""
    from jaxreg.data.keymorph import label_table, remap_labels

    table = label_table([s.labels for s in subjects if s.labels is not None])
    for s in subjects:
        if s.labels is not None:
            s.labels = remap_labels(s.labels, table)
    return len(table) + 1


def build_slice_data(config):
    """``(SliceSource, val_examples, grid)`` for feature-extractor pretraining (``config.data.kind == 'slices'``).

    ``data.train_cases`` / ``data.val_cases`` are loaded with
    :func:`jaxreg.data.car.load_brain_subjects` (skull-stripped, affinely
    aligned); ``model.contrasts`` are the channels; ``deepsim_seg`` remaps the
    labels to ``1..K`` and requires ``model.num_classes == K + 1``.
    """
    from jaxreg.data.car import load_brain_subjects
    from jaxreg.data.slices import SliceSource, central_slice_examples

    d, m = config.data, config.model
    seg = m.kind == "deepsim_seg"
    names = list(d.train_cases) + list(d.val_cases)
    loaded, shape, affine = load_brain_subjects(d.root, names, resolution=d.resolution, multiple=16,
                                                crop=tuple(d.crop) or None, with_labels=seg)
    if seg:
        classes = _label_table_remap(loaded)
        if classes != m.num_classes:
            raise ValueError(f"the label maps hold {classes - 1} labels; set model.num_classes = {classes}")
    train, val = loaded[:len(d.train_cases)], loaded[len(d.train_cases):]
    axis = _axis(d)
    source = SliceSource(train, contrasts=tuple(m.contrasts), slice_axis=axis, flip=d.flip, with_labels=seg,
                         seed=config.seed)
    return source, central_slice_examples(val, contrasts=tuple(m.contrasts), num_slices=d.num_val,
                                          slice_axis=axis, with_labels=seg), (shape, affine)


def build_crossreg_data(config):
    """``(PairSource, val_examples, grid)`` for cross-contrast registration networks (``data.kind == 'crossreg'``).

    Training: slices of ``data.train_cases`` (multi-contrast, skull-stripped,
    affinely aligned, :func:`jaxreg.data.car.load_brain_subjects`): fixed =
    ``data.fixed_contrast``, moving = one of ``data.moving_contrasts`` of the
    same subject (or of another with ``data.inter_prob``), deformed by a
    random smooth field (``deform_voxels``; the fixed image by an independent
    one too with ``data.deform_fixed``), one contrast pair per batch
    (``contrast_block = batch_size``), indices into ``model.contrasts`` when
    the model has them. Validation: :func:`jaxreg.data.car.known_deformation_examples`
    of ``data.val_cases`` (endpoint error; tumour / lesion Dice where the case has labels).
    Controlled experiments (issue 14) may set ``data.keep_truth`` (the true field in each example, for
    ``model.supervised``; needs ``deform_fixed=False`` and ``inter_prob=0``),
    ``data.remap_fixed`` (``"sin"``: a synthetic fixed contrast of the moving
    image's anatomy, with ``moving_contrasts=("t1",)``), ``data.keep_target`` and
    ``data.val_contrasts`` (default the moving contrasts; ``"sin"`` adds the
    held-out T1 pairs with the fixed slice sin-remapped) and
    ``data.synthetic_cases`` (T1-only cases added to training, whose moving
    image is a random intensity remap of their T1: more subjects, exact
    correspondence).
    """
    from jaxreg.data.car import known_deformation_examples, load_brain_subjects
    from jaxreg.data.pipeline import sin_remap

    d = config.data
    synthetic = tuple(d.get("synthetic_cases") or ())
    names = list(d.train_cases) + list(synthetic) + list(d.val_cases)
    loaded, shape, affine = load_brain_subjects(d.root, names, resolution=d.resolution,
                                                multiple=2 ** len(config.model.enc_features),
                                                crop=tuple(d.crop) or None, with_labels=False, lesion_labels=True)
    n_train = len(d.train_cases) + len(synthetic)
    train, val = loaded[:n_train], loaded[n_train:]
    for s in train:
        s.labels = None
    moving = tuple(d.moving_contrasts)
    for s in train[len(d.train_cases):]:  # T1-only cases: every contrast is the T1, remapped per example
        s.images.update({c: s.images[d.fixed_contrast] for c in moving})
    names_idx = tuple(config.model.contrasts) if "contrasts" in config.model else (d.fixed_contrast, *moving)
    source = PairSource(train, mode="intra", fixed_contrast=d.fixed_contrast, moving_contrast=moving,
                        seed=config.seed, deform_voxels=d.deform_voxels, deform_spacing=d.deform_spacing,
                        deform_fixed=d.get("deform_fixed", False), slice_axis=_axis(d), flip=d.flip,
                        contrast_block=config.batch_size, contrast_names=names_idx, inter_prob=d.inter_prob,
                        keep_truth=d.get("keep_truth", False), remap_fixed=d.get("remap_fixed") or None,
                        keep_target=d.get("keep_target", False),
                        remap_moving=tuple(s.name for s in train[len(d.train_cases):]))
    if d.get("keep_truth", False) and not source.keep_truth:
        raise ValueError("data.keep_truth needs data.deform_fixed=False and data.inter_prob=0")
    val_contrasts = tuple(d.get("val_contrasts") or moving)
    real = tuple(c for c in val_contrasts if c != "sin")
    kw = dict(num_slices=d.num_val, deform_voxels=d.deform_voxels, deform_spacing=d.deform_spacing, seed=0,
              axis=_axis(d), fixed_contrast=d.fixed_contrast)
    examples = known_deformation_examples(val, contrasts=real, **kw) if real else []
    if "sin" in val_contrasts:  # the synthetic contrast: the fixed T1 sin-remapped against its own deformed T1
        for ex in known_deformation_examples(val, contrasts=(d.fixed_contrast,), **kw):
            examples.append({**ex, "fixed": sin_remap(ex["fixed"]), "contrast": "sin", "name": f"{ex['name']} sin"})
    return source, examples, (shape, affine)


def build_data(config, workdir: pathlib.Path):
    """``(train_source, val_examples, grid)`` from ``config.data`` (see configs/)."""
    d = config.data
    if d.get("kind") == "slices":
        return build_slice_data(config)
    if d.get("kind") == "crossreg":
        return build_crossreg_data(config)
    if d.get("kind") == "views":
        return build_view_data(config)
    if d.get("kind") == "keymorph":
        return build_keymorph_data(config)
    if d.get("kind") == "car":
        return build_car_data(config)
    manifest = d.manifest or builtin_manifest(d.source, d.root, workdir)
    subjects = read_manifest(manifest, contrasts=tuple(d.contrasts))
    loaded, shape, affine = load_subjects(subjects, contrasts=tuple(d.contrasts), resolution=d.resolution,
                                          multiple=2 ** len(config.model.enc_features), prealign=d.prealign)
    if d.get("crop"):
        crop = tuple(d.crop)
        for s in loaded:
            sl = tuple(slice((n - c) // 2, (n - c) // 2 + c) for n, c in zip(shape, crop))
            s.images = {k: v[sl] for k, v in s.images.items()}
            s.labels = None if s.labels is None else s.labels[sl]
        shape = crop
    train_idx, val_idx = _split(d.train_subjects, len(loaded)), _split(d.val_subjects, len(loaded))
    train_subjects = [loaded[i] for i in train_idx]
    source = PairSource(train_subjects, mode=d.mode, fixed_contrast=d.fixed_contrast,
                        moving_contrast=d.moving_contrast, seed=config.seed, deform_voxels=d.deform_voxels,
                        remap_fixed=d.remap_fixed or None, slice_axis=_axis(d),
                        keep_target=d.get("loss_on_original_fixed", False), remap_prob=d.get("remap_prob", 1.0),
                        deform_fixed=d.get("deform_fixed", False), deform_spacing=d.get("deform_spacing", 16),
                        flip=d.get("flip", False))
    val_subjects = [loaded[i] for i in val_idx]
    val = []
    if len(val_subjects) >= 2 and d.mode == "inter":
        pairs = [(k, (k + 1) % len(val_subjects)) for k in range(len(val_subjects))]
        for remap in d.val_remaps:
            for ex in fixed_pairs(val_subjects, pairs, fixed_contrast=d.fixed_contrast,
                                  moving_contrast=d.moving_contrast, remap_fixed=remap or None):
                ex["name"] += f" ({remap or 'mono'})"
                val.append(ex)
    elif val_subjects:
        vsrc = PairSource(val_subjects, mode=d.mode, fixed_contrast=d.fixed_contrast,
                          moving_contrast=d.moving_contrast, seed=config.seed + 10_000,
                          deform_voxels=d.deform_voxels, remap_fixed=d.remap_fixed or None,
                          slice_axis=_axis(d), keep_truth=True)
        val = [dict(vsrc[i], name=f"val{i}") for i in range(d.get("num_val", 4))]
    return source, val, (shape, affine)


# ----------------------------------------------------------------------------- model and steps

BATCH_KEYS = ("fixed", "moving", "fixed_target", "disp_true", "same", "fixed_labels", "moving_labels", "task", "pretrain",
              "images", "labels", "fixed_contrast", "moving_contrast")

def make_optimizer(config) -> optax.GradientTransformation:
    lr = config.learning_rate
    if config.get("schedule", "constant") == "cosine":
        warm = min(config.get("warmup_steps", 0), config.num_train_steps // 2)
        lr = optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(config.num_train_steps, warm + 1),
                                                end_value=0.1 * lr)
    tx = optax.adam(lr)
    if config.get("grad_clip"):
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
    return tx


def create_state(config, mesh):
    """``(graphdef, state, tx, method_module)``; ``state`` is replicated on ``mesh``."""
    mod, mcfg = method_config(config.method, dict(config.model))
    key = jax.random.key(config.seed)
    model = mod.init(jax.random.fold_in(key, 0), mcfg)
    graphdef, params = nnx.split(model)
    tx = make_optimizer(config)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "key": jax.random.key_data(jax.random.fold_in(key, 1))}
    state = jax.device_put(state, parallel.replicated(mesh))
    return graphdef, state, tx, mod


def make_train_step(graphdef, tx, mod, mesh):
    """Jitted ``(state, batch) -> (state, metrics)``; state donated, batch sharded over ``'data'``."""
    repl, bsh = parallel.replicated(mesh), parallel.batch_sharding(mesh)

    def step(state, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), state["step"])

        def loss(params):
            return mod.loss_fn(nnx.merge(graphdef, params), batch, key=key)

        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": value, **{k: v for k, v in aux.items() if v is not None and jnp.ndim(v) == 0},
                   "grad_norm": optax.tree.norm(grads)}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "key": state["key"]}, metrics

    return jax.jit(step, in_shardings=(repl, bsh), out_shardings=(repl, repl), donate_argnums=0)


def make_forward(graphdef):
    """Jitted ``(params, fixed, moving, lam) -> disp`` for evaluation (``lam`` None unless lambda-conditioned)."""

    @jax.jit
    def forward(params, fixed, moving, lam):
        _, disp, _ = nnx.merge(graphdef, params)(fixed, moving, lam)
        return disp

    return forward


def evaluate(forward, params, examples, *, lam=None, spacing: float = 1.0) -> dict:
    """Mean Dice (labels present in either map), % folding and SDlogJ over validation examples.

    Pairs without labels in either map (Dice NaN, e.g. slices without tumour)
    are left out of the mean Dice.
    Examples with a known deformation (``disp_true``) also give the mean
    endpoint error in mm (``spacing`` mm voxels) over the fixed image's
    foreground (> 0.05), after (``val_epe_mm``) and before
    (``val_epe_before_mm``, i.e. of the identity) registration.
    Examples with a ``contrast`` name also give ``val_epe_mm_<contrast>`` /
    ``val_dice_<contrast>`` per contrast.
    Also returns ``first_disp``, the first example's displacement (for the QC image).
    """
    folds, sd, per, epes = [], [], [], []
    for ex in examples:
        f, m = jnp.asarray(ex["fixed"])[None], jnp.asarray(ex["moving"])[None]
        lam_b = None if lam is None else jnp.full((1,), lam, jnp.float32)
        disp = forward(params, f, m, lam_b)[0]
        if not per:
            first_disp = disp
        row = {"name": ex["name"], "folding_percent": float(M.folding_percent(disp)), "sdlogj": float(M.sdlogj(disp))}
        if "fixed_labels" in ex:
            warped = np.asarray(warp_labels(jnp.asarray(ex["moving_labels"]), disp))
            row["dice"] = float(np.nanmean(M.dice(warped, ex["fixed_labels"])))
            row["dice_before"] = float(np.nanmean(M.dice(ex["moving_labels"], ex["fixed_labels"])))
        if "disp_true" in ex:
            truth, fg = np.asarray(ex["disp_true"]), np.asarray(ex["fixed"])[..., 0] > 0.05
            sp = [spacing] * truth.shape[-1]
            row["epe_mm"] = M.endpoint_error_stats(np.asarray(disp), truth, spacing=sp, mask=fg)["mean"]
            row["epe_before_mm"] = M.endpoint_error_stats(np.zeros_like(truth), truth, spacing=sp, mask=fg)["mean"]
            epes.append((row["epe_mm"], row["epe_before_mm"]))
        if "contrast" in ex:
            row["contrast"] = ex["contrast"]
        folds.append(row["folding_percent"])
        sd.append(row["sdlogj"])
        per.append(row)
    out = {"val_folding_percent": float(np.mean(folds)), "val_sdlogj": float(np.mean(sd)), "val_pairs": per,
           "first_disp": first_disp}
    if any("dice" in r for r in per):
        scored = [r for r in per if "dice" in r and np.isfinite(r["dice"])]
        out["val_dice"] = float(np.mean([r["dice"] for r in scored])) if scored else float("nan")
        out["val_dice_before"] = float(np.mean([r["dice_before"] for r in scored])) if scored else float("nan")
    if epes:
        out["val_epe_mm"], out["val_epe_before_mm"] = (float(v) for v in np.mean(epes, axis=0))
    for c in sorted({r["contrast"] for r in per if "contrast" in r}):  # per moving contrast (CAR's tests)
        rows = [r for r in per if r.get("contrast") == c]
        for k in ("epe_mm", "dice"):
            vals = [r[k] for r in rows if k in r and np.isfinite(r[k])]
            if vals:
                out[f"val_{k}_{c.replace('->', '_')}"] = float(np.mean(vals))
    return out


# ----------------------------------------------------------------------------- logging

class Logger:
    """Appends JSON lines to ``metrics.jsonl`` and scalars to TensorBoard."""

    def __init__(self, workdir: pathlib.Path, resume_step: int):
        self.path = workdir / "metrics.jsonl"
        if self.path.exists():  # drop lines logged after the checkpoint we resume from
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(k + "\n" for k in keep))
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(workdir / "tb"))

    def write(self, step: int, values: dict) -> None:
        row = {"step": int(step), **{k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                                      for k, v in values.items()}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)) and np.isfinite(v):
                self.tb.add_scalar(k, v, step)

    def close(self):
        self.tb.close()


def _qc(path, ex, disp):
    from jaxreg.viz import qc_figure

    warped = np.asarray(warp(jnp.asarray(ex["moving"]), disp))[..., 0]
    qc_figure(ex["fixed"][..., 0], ex["moving"][..., 0], warped, np.asarray(disp), np.asarray(M.jacobian_det(disp)),
              path, overwrite=True, title=ex["name"])


# ----------------------------------------------------------------------------- main loop

def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
    """Train ``config.method`` on ``config.data``; resume from ``workdir`` if it holds checkpoints.

    Returns the last logged metrics and validation summary (also in
    ``workdir/metrics.jsonl``).

    Raises:
      ValueError: batch size not divisible by the number of devices, bad config.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = parallel.make_mesh(config.get("num_devices") or None)
    if config.batch_size % mesh.devices.size:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the {mesh.devices.size} devices")
    source, val, grid = build_data(config, workdir)
    graphdef, state, tx, mod = create_state(config, mesh)
    ckpt = Checkpointer(workdir / "checkpoints", keep=config.get("keep_checkpoints", 3))
    data_state = None
    if ckpt.latest_step() is not None:
        state, data_state = ckpt.restore(abstract_like(state, parallel.replicated(mesh)))
    start = int(state["step"])
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
    it = iter(make_dataset(source, batch_size=config.batch_size))
    if data_state is not None:
        it.set_state(data_state)
    train_step = make_train_step(graphdef, tx, mod, mesh)
    forward = make_forward(graphdef)
    logger = Logger(workdir, start)
    last, last_val = {}, {}
    t0, t_last = time.perf_counter(), time.perf_counter()
    steps_since = 0
    lam_eval = config.get("eval_lambda") if config.model.get("hyper") else None
    with tqdm(total=config.num_train_steps, initial=start, desc="train", disable=config.get("quiet", False)) as bar:
        for step in range(start, config.num_train_steps):
            batch = next(it)
            batch = parallel.shard_batch({k: batch[k] for k in BATCH_KEYS if k in batch}, mesh)
            state, metrics = train_step(state, batch)
            steps_since += 1
            done = step + 1
            bar.update(1)
            if done % config.log_every == 0 or done == config.num_train_steps:
                vals = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                vals["steps_per_s"] = steps_since / (now - t_last)
                t_last, steps_since = now, 0
                logger.write(done, vals)
                bar.set_postfix(loss=f"{vals['loss']:.4g}")
                last = vals
            if done % config.checkpoint_every == 0 or done == config.num_train_steps:
                ckpt.save(done, state, it.get_state())
            if val and config.eval_every and (done % config.eval_every == 0 or done == config.num_train_steps) \
                    and hasattr(mod, "validate"):
                res = mod.validate(nnx.merge(graphdef, state["params"]), val)
                logger.write(done, {k: v for k, v in res.items() if k != "val_pairs"})
                last_val = res
            elif val and config.eval_every and (done % config.eval_every == 0 or done == config.num_train_steps):
                res = evaluate(forward, state["params"], val, lam=lam_eval, spacing=config.data.resolution)
                disp = res.pop("first_disp")
                logger.write(done, {k: v for k, v in res.items() if k != "val_pairs"})
                (workdir / "qc").mkdir(exist_ok=True)
                _qc(workdir / "qc" / f"step_{done:07d}.png", val[0], disp)
                last_val = res
    ckpt.close()
    logger.close()
    return {"step": int(state["step"]), "wall_s": time.perf_counter() - t0, **last,
            **{k: v for k, v in last_val.items()}, "train_step_traces": train_step._cache_size()}
