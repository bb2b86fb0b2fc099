"""``jaxreg compare``: every method on the same real pairs, one table (issue 16).

A comparison config (``configs/compare_brain.py``) names *pair sets* and
*methods*. Each pair set is built once from real scans (``$JAXREG_DATA``) on a
working grid, written as NIfTI, and every method registers every pair through
the same code as ``jaxreg register`` (:func:`jaxreg.cli._registration_runner`),
so a row of the table is what a user of that method gets.

Pair sets (``kind``):

* ``known_deformation``: one subject's co-registered contrasts; the fixed
  contrast against each moving contrast deformed by a seeded smooth
  diffeomorphism (:func:`jaxreg.data.pairs.known_deformation_pair`). The
  truth is known: endpoint error (mm, mean inside the fixed scan's
  foreground) and the subject's label map (tumour, lesion) warped with it.
* ``inter_subject``: labelled subjects (IXI, 148 DLMUSE labels) in both
  directions, as stored; ``remap_fixed`` gives the fixed scan a synthetic
  contrast (:func:`jaxreg.data.pairs.remap_intensity`) for a cross-contrast
  pair with the same labels.

Scores per pair (:func:`score_pair`): Dice (mean over the set's labels
present in either map), Dice30 (mean of the worst 30 %), HD95 (mm), % folding
(det J <= 0) and SDlogJ of the whole map on the fixed grid, endpoint error
where the truth is known, and the wall time of the registration call
(including XLA compilation on the first pair of a size class; the table gives
the median).

Methods: ``identity`` (the headers alone), ``ants`` (ANTs SyN, Mattes MI,
through antspyx when it is installed) and every ``jaxreg register --method``;
a learned method whose checkpoint does not exist is left out with a line that
says how to train it. A method marks the pair sets whose cases its training
saw (``trained_on``).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

SCORE_KEYS = ("dice", "dice30", "hd95_mm", "folding_percent", "sdlogj", "epe_mm", "time_s")
HEADINGS = {"dice": "Dice", "dice30": "Dice30", "hd95_mm": "HD95 (mm)", "folding_percent": "% folding",
            "sdlogj": "SDlogJ", "epe_mm": "EPE (mm)", "time_s": "time (s)"}
LEARNED = ("vxm", "car", "contrareg", "deepsim")


@dataclasses.dataclass
class Pair:
    """One prepared pair: NIfTI paths (fixed grid = ``fixed``) and the truth where known."""

    set: str
    name: str
    fixed: str
    moving: str
    fixed_labels: str | None = None
    moving_labels: str | None = None
    labels: tuple[int, ...] | None = None   # the labels scored (None: every label in either map)
    disp_true: str | None = None            # .npy, (*fixed, 3) true map fixed -> moving in fixed voxels
    cases: tuple[str, ...] = ()             # the data cases the pair is made from


def load_config(spec: str):
    """``path/to/config.py[:arg]`` -> the module's ``get_config(arg)`` (ml_collections' convention).

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: it has no ``get_config``.
    """
    path, _, arg = spec.partition(":")
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path} does not exist")
    root = str(path.resolve().parent.parent)  # a config in configs/ may import its siblings as configs.<name>
    if (path.parent / "__init__.py").is_file() and root not in sys.path:
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location(f"_jaxreg_compare_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config {path} defines no get_config()")
    return module.get_config(arg) if arg else module.get_config()


# ----------------------------------------------------------------------------- pairs

def prepare_pairs(config, data_root: pathlib.Path, workdir: pathlib.Path, report: Callable = print, *,
                  specs=None) -> list[Pair]:
    """Build the pair sets ``specs`` (default all of ``config.pair_sets``) under ``workdir`` (NIfTI + .npy truth).

    Raises:
      FileNotFoundError: a case or file named by the config is missing under ``data_root``.
      ValueError: an unknown pair-set kind.
    """
    pairs = []
    for spec in (config.pair_sets if specs is None else specs):
        spec = dict(spec)
        kind = spec["kind"]
        if kind == "known_deformation":
            pairs += _known_deformation_set(spec, config, data_root, workdir, report)
        elif kind == "inter_subject":
            pairs += _inter_subject_set(spec, data_root, workdir, report)
        else:
            raise ValueError(f"pair set {spec.get('name')!r}: unknown kind {kind!r} "
                             f"(known_deformation or inter_subject)")
    return pairs


def _require(path: pathlib.Path) -> pathlib.Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (set JAXREG_DATA to the shared data folder)")
    return path


def _known_deformation_set(spec, config, data_root, workdir, report):
    from jaxreg.data.pairs import known_deformation_pair
    from jaxreg.io import load_image, load_labels, save_image

    name, case = spec["name"], spec["case"]
    src = data_root / case
    fixed = load_image(_require(src / f"{spec['fixed']}.nii.gz"))
    labels = load_labels(_require(src / spec["labels"])) if spec.get("labels") else None
    out = workdir / name
    out.mkdir(parents=True, exist_ok=True)
    pairs = []
    seed = int(config.get("seed", 0)) + int(spec.get("seed", 0))
    for i, contrast in enumerate(spec["moving"]):
        moving = load_image(_require(src / f"{contrast}.nii.gz"))
        p = known_deformation_pair(fixed, moving, labels, seed=seed + i, resolution=float(config.resolution),
                                   mean_mm=float(config.deform_mm), control_spacing=int(config.control_spacing))
        aff = p["affine"]
        stem = out / f"{contrast}"
        if i == 0:  # the fixed image and labels are the same for every moving contrast of the case
            fixed_path = str(save_image(out / "fixed.nii.gz", p["fixed"], aff, overwrite=True))
            fixed_labels_path = None if p["fixed_labels"] is None else str(
                save_image(out / "fixed_labels.nii.gz", p["fixed_labels"].astype(np.int16), aff, overwrite=True))
        pair = Pair(set=name, name=f"{case.split('/')[-1]} {contrast}->{spec['fixed']}", fixed=fixed_path,
                    moving=str(save_image(f"{stem}_moving.nii.gz", p["moving"], aff, overwrite=True)),
                    fixed_labels=fixed_labels_path,
                    labels=tuple(int(v) for v in spec["label_values"]) if spec.get("label_values") else None,
                    cases=(case,))
        if p["moving_labels"] is not None:
            pair.moving_labels = str(save_image(f"{stem}_moving_labels.nii.gz",
                                                p["moving_labels"].astype(np.int16), aff, overwrite=True))
        np.save(f"{stem}_disp_true.npy", p["disp_true"])
        pair.disp_true = f"{stem}_disp_true.npy"
        pairs.append(pair)
        report(f"prepared {name}: {pair.name} on a {tuple(p['fixed'].shape)} grid")
    return pairs


def _inter_subject_set(spec, data_root, workdir, report):
    from jaxreg.data.pairs import remap_intensity
    from jaxreg.io import load_image, save_image

    name, subjects = spec["name"], list(spec["subjects"])
    if len(subjects) < 2:
        raise ValueError(f"pair set {name!r}: inter_subject needs at least two subjects")
    out = workdir / name
    out.mkdir(parents=True, exist_ok=True)
    limit = spec.get("max_pairs") or len(subjects) * (len(subjects) - 1)
    pairs = []
    for fix in subjects:
        if len(pairs) >= limit:
            break
        fixed_path = _require(data_root / f"{fix}_t1.nii.gz")
        if spec.get("remap_fixed"):  # once per fixed subject
            f = load_image(fixed_path)
            fixed_path = save_image(out / f"{pathlib.Path(fix).name}_remapped.nii.gz", remap_intensity(f.data),
                                    f.affine, overwrite=True)
        for mov in subjects:
            if fix == mov or len(pairs) >= limit:
                continue
            pairs.append(Pair(set=name, name=f"{pathlib.Path(mov).name}->{pathlib.Path(fix).name}",
                              fixed=str(fixed_path), moving=str(_require(data_root / f"{mov}_t1.nii.gz")),
                              fixed_labels=str(_require(data_root / f"{fix}_labels.nii.gz")),
                              moving_labels=str(_require(data_root / f"{mov}_labels.nii.gz")),
                              cases=(fix, mov)))
            report(f"prepared {name}: {pairs[-1].name}")
    return pairs


# ----------------------------------------------------------------------------- scores

def score_pair(disp_fixed, fixed, fixed_labels=None, warped_labels=None, *, labels=None, disp_true=None,
               mask=None) -> dict:
    """The table's scores of one registration (host floats; None where they do not apply).

    Args:
      disp_fixed: ``(*fixed, 3)`` whole map fixed -> moving in fixed voxels
        (``Registration.disp_fixed``).
      fixed: the fixed :class:`jaxreg.io.Volume` (its affine gives the spacing).
      fixed_labels, warped_labels: ``(*fixed)`` integer label maps (the moving
        labels already on the fixed grid), or None.
      labels: label values to score; None = every non-zero value in either map.
      disp_true: ``(*fixed, 3)`` true map in fixed voxels, or None.
      mask: ``(*fixed)`` voxels where the endpoint error is averaged
        (default ``fixed.data > 0``).

    Returns:
      ``dice``, ``dice30``, ``hd95_mm`` (NaN-free means over the scored labels;
      HD95 over labels present in both maps), ``folding_percent`` (0-100),
      ``sdlogj``, ``epe_mm`` (mean endpoint error, mm).
    """
    import jax.numpy as jnp

    from jaxreg import metrics as M
    from jaxreg.spatial import voxel_spacing

    spacing = tuple(float(s) for s in voxel_spacing(fixed.affine)[:3])
    d = jnp.asarray(disp_fixed, jnp.float32)
    out = {k: None for k in SCORE_KEYS if k != "time_s"}
    out["folding_percent"] = float(M.folding_percent(d))
    out["sdlogj"] = float(M.sdlogj(d))
    if fixed_labels is not None and warped_labels is not None:
        fl, wl = np.asarray(fixed_labels, np.int32), np.asarray(warped_labels, np.int32)
        if labels is None:
            labels = [int(v) for v in np.union1d(np.unique(fl), np.unique(wl)) if v != 0]
        per = np.asarray(M.dice(wl, fl, labels=list(labels)), np.float64)
        if np.any(np.isfinite(per)):
            out["dice"] = float(M.dice_mean(per))
            out["dice30"] = float(M.dice30(per))
        hd = np.asarray(M.hd95(wl, fl, spacing=spacing, labels=list(labels)), np.float64)
        if np.any(np.isfinite(hd)):
            out["hd95_mm"] = float(np.nanmean(hd))
    if disp_true is not None:
        m = np.asarray(fixed.data) > 0 if mask is None else np.asarray(mask)
        out["epe_mm"] = float(M.endpoint_error_stats(np.asarray(disp_fixed, np.float32), np.asarray(disp_true),
                                                     spacing=spacing, mask=m)["mean"])
    return out


# ----------------------------------------------------------------------------- methods

def _method_args(entry: dict, resolution) -> argparse.Namespace:
    """The ``jaxreg register`` arguments of a method entry (what :func:`jaxreg.cli._registration_runner` reads)."""
    tps = entry.get("tps_lambda")
    return argparse.Namespace(method=entry["method"], checkpoint=entry.get("checkpoint"), weights=entry.get("weights"),
                              lam=entry.get("lam"), transform=entry.get("transform"),
                              tps_lambda=None if tps is None else str(tps), no_affine=not entry.get("affine", True),
                              init=entry.get("init", "auto"), levels=entry.get("levels"),
                              iterations=None if entry.get("iterations") is None else list(entry["iterations"]),
                              resolution=entry.get("resolution", resolution), out=".", overwrite=True)


def unavailable(entry: dict, repo: pathlib.Path) -> str | None:
    """Why a method entry cannot run here (no checkpoint, no antspyx), or None."""
    method = entry["method"]
    if method in LEARNED:
        ckpt = entry.get("checkpoint")
        path = None if ckpt is None else (pathlib.Path(ckpt) if pathlib.Path(ckpt).is_absolute() else repo / ckpt)
        if path is None or not path.exists():
            how = entry.get("train", "")
            return f"not trained here: no checkpoint at {ckpt}" + (f" (train with `{how}`)" if how else "")
    if method == "ants":
        if importlib.util.find_spec("ants") is None:
            return "antspyx is not installed (pip install antspyx)"
    return None


def ants_dense_disp(ants, fixed_path, moving_path, transforms, prefix, fixed_affine, moving_affine) -> np.ndarray:
    """ANTs transforms composed into one dense map, as ``Registration.disp_fixed`` (fixed voxels).

    ``antsApplyTransforms`` composes ``transforms`` into one ITK warp on the
    fixed grid (``compose=prefix``), which is read back and turned into the
    fixed-voxel map, so ANTs is scored by the same code as jaxreg.

    Raises:
      RuntimeError: ANTs wrote no composed warp.
    """
    from jaxreg.data.pairs import to_fixed_voxels
    from jaxreg.io import load_itk_warp, world_warp_to_voxel_disp

    comp = ants.apply_transforms(ants.image_read(str(fixed_path)), ants.image_read(str(moving_path)),
                                 list(transforms), compose=str(prefix))
    if comp is None:
        raise RuntimeError("antsApplyTransforms did not write the composed warp")
    d_lps, warp_affine = load_itk_warp(comp)
    voxel_map = world_warp_to_voxel_disp(d_lps, warp_affine, moving_affine)  # into moving voxels
    return to_fixed_voxels(voxel_map, fixed_affine, moving_affine)


def ants_warp_labels(ants, fixed_path, labels_path, transforms) -> np.ndarray:
    """A label map through ANTs transforms onto the fixed grid (nearest neighbour), int32."""
    f = ants.image_read(str(fixed_path)).clone("float")
    w = ants.apply_transforms(f, ants.image_read(str(labels_path)), list(transforms), interpolator="nearestNeighbor")
    return np.rint(w.numpy()).astype(np.int32)


def _ants_runner(workdir: pathlib.Path):
    """``run(pair, fixed_affine, moving_affine) -> (disp_fixed, warped_labels)`` for ANTs SyN (Mattes MI)."""
    import ants

    if hasattr(ants, "config") and hasattr(ants.config, "_random_seed"):
        ants.config._random_seed = 1  # reproducible Mattes sampling

    def run(pair: Pair, fixed_affine, moving_affine):
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="ants_", dir=workdir))
        reg = ants.registration(ants.image_read(pair.fixed), ants.image_read(pair.moving), type_of_transform="SyN",
                                aff_metric="mattes", syn_metric="mattes", outprefix=str(tmp / "ants_"))
        tx = reg["fwdtransforms"]
        disp = ants_dense_disp(ants, pair.fixed, pair.moving, tx, tmp / "dense_", fixed_affine, moving_affine)
        warped = ants_warp_labels(ants, pair.fixed, pair.moving_labels, tx) if pair.moving_labels else None
        return disp, warped

    return run


def _load_pair(pair: Pair) -> dict:
    """A prepared pair's volumes and truth, read once for every method."""
    from jaxreg.io import load_image, load_labels

    return {"fixed": load_image(pair.fixed), "moving": load_image(pair.moving),
            "fixed_labels": load_labels(pair.fixed_labels) if pair.fixed_labels else None,
            "moving_labels": load_labels(pair.moving_labels) if pair.moving_labels else None,
            "truth": np.load(pair.disp_true) if pair.disp_true else None}


def run_method(entry: dict, pairs: list[Pair], *, resolution, workdir: pathlib.Path, report: Callable,
               loaded: list[dict] | None = None) -> list[dict]:
    """Register every pair with one method entry; one row of scores per pair (``loaded``: :func:`_load_pair`'s)."""
    from jaxreg import cli, pipeline

    method = entry["method"]
    if method == "ants":
        ants_run = _ants_runner(workdir)
    elif method != "identity":
        runner, _, _ = cli._registration_runner(_method_args(entry, resolution), report)
    rows = []
    for pair, vols in zip(pairs, loaded or [_load_pair(p) for p in pairs]):
        fixed, moving, moving_labels = vols["fixed"], vols["moving"], vols["moving_labels"]
        t0 = time.perf_counter()
        if method == "identity":  # the headers alone
            disp = np.zeros((*fixed.data.shape, 3), np.float32)
            warped = None if moving_labels is None else pipeline.warp_labels_to_fixed(moving_labels, fixed, None)
        elif method == "ants":
            disp, warped = ants_run(pair, fixed.affine, moving.affine)
        else:
            reg = runner(fixed, moving)
            disp = reg.disp_fixed
            warped = None if moving_labels is None else pipeline.warp_labels_to_fixed(moving_labels, fixed, reg)
        wall = time.perf_counter() - t0
        scores = score_pair(disp, fixed, None if vols["fixed_labels"] is None else vols["fixed_labels"].data, warped,
                            labels=pair.labels, disp_true=vols["truth"])
        rows.append({"set": pair.set, "pair": pair.name, "method": entry["name"], **scores,
                     "time_s": 0.0 if method == "identity" else wall})
        report(f"  {entry['name']}: {pair.name}: " + ", ".join(
            f"{k} {v:.3g}" for k, v in rows[-1].items() if isinstance(v, float)))
    return rows


# ----------------------------------------------------------------------------- the table

def summarize(rows: list[dict]) -> dict:
    """``{set: {method: {key: mean (time: median) over the set's pairs}}}`` (None where no pair has the key)."""
    out = {}
    for r in rows:
        out.setdefault(r["set"], {}).setdefault(r["method"], []).append(r)
    summ = {}
    for s, by_method in out.items():
        summ[s] = {}
        for m, rs in by_method.items():
            vals = {}
            for k in SCORE_KEYS:
                xs = [r[k] for r in rs if r.get(k) is not None and math.isfinite(r[k])]
                vals[k] = None if not xs else (statistics.median(xs) if k == "time_s" else float(np.mean(xs)))
            vals["pairs"] = len(rs)
            summ[s][m] = vals
    return summ


def _fmt(k, v):
    if v is None:
        return "–"
    if k in ("dice", "dice30", "sdlogj"):
        return f"{v:.3f}"
    if k == "folding_percent":
        return f"{v:.2f}"
    if k == "time_s":
        return f"{v:.1f}"
    return f"{v:.2f}"


def markdown(config, summary: dict, methods: list[dict], skipped: list[tuple[str, str]], meta: dict,
             cases: dict[str, set] | None = None) -> str:
    """``results.md``: one table per pair set (a row per method), the skipped methods and how it was run.

    ``cases``: ``{set: its data cases}`` (:func:`set_cases`) for the marks of methods trained on them.
    """
    lines = [f"# jaxreg compare: {config.get('title', 'methods on the same pairs')}", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}; commit {meta['commit']}; "
             f"{meta['machine']}; total {meta['total_s'] / 60:.1f} min.", ""]
    for u in meta.get("updates", ()):
        lines += [f"Updated: `{u['command']}` ({u['date']}, commit {u['commit']}, {u['total_s'] / 60:.1f} min).  "]
    if meta.get("updates"):
        lines.append("")
    if config.get("description"):
        lines += [str(config.description).strip(), ""]
    lines += ["Scores: Dice = mean over the set's labels, Dice30 = mean of the worst 30 % of labels, HD95 in mm, "
              "% folding = voxels with det J <= 0, SDlogJ over the whole fixed grid, EPE = mean endpoint error "
              "inside the fixed foreground where the true map is known, time = median wall time of one "
              "registration call on the 2-core machine (the first pair of a size class includes XLA "
              "compilation). `†`: the method's training saw this set's cases. Lower is better except Dice.", ""]
    for spec in config.pair_sets:
        spec = dict(spec)
        s = spec["name"]
        if s not in summary:
            continue
        keys = [k for k in SCORE_KEYS if any(v.get(k) is not None for v in summary[s].values())]
        n = next(iter(summary[s].values()))["pairs"]
        lines += [f"## {s}: {spec.get('title', '')} ({n} pair{'s' if n != 1 else ''})", "",
                  "| method | " + " | ".join(HEADINGS[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for entry in methods:
            v = summary[s].get(entry["name"])
            if v is None:
                continue
            seen = " †" if (cases or {}).get(s, set()) & set(entry.get("trained_on", ())) else ""
            lines.append(f"| {entry['name']}{seen} | " + " | ".join(_fmt(k, v[k]) for k in keys) + " |")
        lines.append("")
    if skipped:
        lines += ["## Left out", ""] + [f"- **{name}**: {why}" for name, why in skipped] + [""]
    return "\n".join(lines)


def merge(previous: dict, rows: list[dict], methods: list[dict], skipped: list, meta: dict, config):
    """An earlier run's ``results.json`` updated by a rerun of some methods (``jaxreg compare --update``).

    The earlier rows of every (pair set, method) that the rerun produced are
    replaced; the others are kept. Returns ``(rows, methods, skipped, meta)``
    with the methods in the config's order and ``meta["updates"]`` listing
    the reruns.
    """
    redone = {(r["set"], r["method"]) for r in rows}
    merged = [r for r in previous.get("rows", []) if (r["set"], r["method"]) not in redone] + rows
    names = {r["method"] for r in merged}
    ran = {m["name"] for m in methods}
    entries = [dict(m) for m in config.methods if m["name"] in names]
    left = [tuple(x) for x in previous.get("skipped", []) if x[0] not in names and x[0] not in ran]
    left += [x for x in skipped if x[0] not in names]
    first = dict(previous.get("meta", {}))
    updates = list(first.pop("updates", [])) + [{k: meta[k] for k in ("command", "date", "commit", "total_s")}]
    return merged, entries, left, {**first, "updates": updates}


def set_cases(pairs: list[Pair]) -> dict[str, set]:
    """``{pair set: the data cases its pairs are made from}``."""
    by_set = {}
    for p in pairs:
        by_set.setdefault(p.set, set()).update(p.cases)
    return by_set


def compare(config, *, data_root: pathlib.Path, workdir: pathlib.Path, methods: list[str] | None = None,
            sets: list[str] | None = None, report: Callable = print, repo: pathlib.Path | None = None):
    """Prepare the pairs and run every (selected) method: ``(rows, summary, run_methods, skipped, cases)``.

    ``methods`` / ``sets``: the entry names to keep (None: all). A method that
    cannot run here, or that fails, is listed in ``skipped`` with the reason.

    Raises:
      ValueError: a name in ``methods`` or ``sets`` is not in the config.
      FileNotFoundError: as :func:`prepare_pairs`.
    """
    repo = repo or pathlib.Path.cwd()
    entries = [dict(m) for m in config.methods]
    specs = [dict(s) for s in config.pair_sets]
    for wanted, have, what in ((methods, [e["name"] for e in entries], "method"),
                               (sets, [s["name"] for s in specs], "pair set")):
        unknown = sorted(set(wanted or ()) - set(have))
        if unknown:
            raise ValueError(f"unknown {what} {', '.join(unknown)}; the config has: {', '.join(have)}")
    if sets:
        specs = [s for s in specs if s["name"] in sets]
    if methods:
        entries = [e for e in entries if e["name"] in methods]
    pairs = prepare_pairs(config, data_root, workdir, report, specs=specs)
    loaded = [_load_pair(p) for p in pairs]  # read once, scored by every method
    rows, run, skipped = [], [], []
    resolution = config.get("method_resolution", None)
    for entry in entries:
        why = unavailable(entry, repo)
        if why:
            skipped.append((entry["name"], why))
            report(f"{entry['name']}: left out, {why}")
            continue
        report(f"{entry['name']} ({entry['method']}): {len(pairs)} pairs")
        try:
            rows += run_method(entry, pairs, resolution=resolution, workdir=workdir, report=report, loaded=loaded)
            run.append(entry)
        except Exception as e:  # noqa: BLE001 - one failing method must not lose the others' rows
            skipped.append((entry["name"], f"failed: {type(e).__name__}: {e}"))
            report(f"{entry['name']}: failed: {e}")
    return rows, summarize(rows), run, skipped, set_cases(pairs)
