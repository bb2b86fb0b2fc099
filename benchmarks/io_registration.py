#!/usr/bin/env python
"""Accuracy and speed of jaxreg's instance optimisation against ANTs SyN on real data at 2 mm.

Two parts (see benchmarks/README.md for how to read the output):

(a) Known deformation, real contrasts (``brats_space/tcga_fg6692``). The
    co-registered 1 mm T1/T2/FLAIR/T1c are resampled to a 2 mm grid (Gaussian
    anti-aliasing, ``pipeline.resample_smooth``) and written as NIfTI so every
    method reads identical inputs. Fixed = T1. For each of T2, FLAIR, T1c a
    seeded random smooth diffeomorphism ``(disp, inverse_disp)`` is drawn on
    the 2 mm grid; the 1 mm contrast is warped by ``inverse_disp`` with cubic
    interpolation (``deform_native``) and then resampled to 2 mm like the
    fixed image, so ``moving(x + disp(x)) = contrast(x)``: the true whole map
    fixed -> moving is ``disp``. The same registration of the *undeformed*
    contrast (truth: identity) is run as well: its mean |disp| is the floor
    set by residual misalignment between the BraTS contrasts and by each
    similarity's own bias. Scored:
    endpoint error (mm) inside the brain (fixed T1 > 0), tumour Dice (labels
    1, 2, 4), % folding and SDlogJ of the estimated map, wall time.

(s) Known deformation, synthetic contrast (exact correspondence): the same
    fixed T1 and the same seeded deformations as (a), but the moving image is
    the T1 itself remapped by the non-monotone ``sin(0.9 pi x)`` of part (b)
    before it is deformed. The contrasts differ as much as T1 and T2 do (grey
    matter brighter than white matter) while the anatomy is identical, so
    the ground truth holds exactly; it separates a method's cross-contrast
    error from the misalignment of the real contrasts that part (a)'s floor
    measures. Floor: the undeformed remapped T1 (one registration; it is the
    same image for every seed).

(b) Inter-subject anatomy (``ixi``, 7 T1 scans with 148 DLMUSE labels, 2 mm,
    with skull). Pairs in sorted subject order: moving = subject i, fixed =
    subject i+1 (i = 0..5). Mono-contrast: T1 -> T1. Cross-contrast: the same
    pairs with the FIXED image remapped by the non-monotone smooth function
    ``f(x) = sin(0.9 pi x)``, ``x = clip(I / p99(I[I > 0]), 0, 1)`` (background
    stays 0; grey matter becomes brighter than white matter). Scored: Dice
    (mean over the labels present in either scan), Dice30, HD95 (mm), %
    folding, SDlogJ, wall time, and the identity (through the NIfTI affines)
    and affine-stage baselines.

jaxreg methods run through ``jaxreg.pipeline.register_volumes(...,
resolution=2.0)`` with ``config_for(method)`` defaults; ANTs runs
``ants.registration(type_of_transform='SyN', aff_metric='mattes',
syn_metric='mattes')`` (antspyx defaults otherwise) with
``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS = --threads``. ANTs' transforms are
composed by ``antsApplyTransforms`` into one dense ITK warp on the fixed grid
(``ants.apply_transforms(..., compose=...)``), read with
``jaxreg.io.load_itk_warp`` and converted to the same fixed-voxel map as
``Registration.disp_fixed``, so both are scored by the same code.

Usage::

    .venv/bin/python benchmarks/io_registration.py            # full run (30-60+ min on 2 cores)
    .venv/bin/python benchmarks/io_registration.py --quick    # 1 pair per part (CI smoke run)
    .venv/bin/python benchmarks/io_registration.py --quick --methods io-mse,ants

Writes ``<out>/io_registration.json`` (every per-pair row and per-method
summaries) and ``<out>/io_registration.md`` (tables), rewritten after every
pair so an interrupted run keeps what it measured.
"""
import argparse
import functools
import json
import math
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
JAX_METHODS = ("io-mind", "io-dns", "io-dns-random", "io-mi", "io-nmi", "io-ngf", "io-lncc", "io-mse")
DEFAULT_METHODS = "io-mind,io-mi,io-ngf,io-lncc,ants"
CONTRASTS = ("t2", "flair", "t1c")
TUMOUR_LABELS = (1, 2, 4)
RESOLUTION = 2.0
DEFORM_MM = 2.5  # mean |disp| of the known deformation, mm (1.25 voxels at 2 mm)
CONTROL_SPACING = 16
# --fast (debugging only): short optimisations, flagged in the outputs.
FAST_JAX = dict(iterations=(20, 15, 10), affine_iterations=(30, 15))
FAST_ANTS = dict(reg_iterations=(10, 5, 0), aff_iterations=(200, 100, 0, 0))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 pair per part (CI-size smoke run)")
    p.add_argument("--ixi-pairs", type=int, default=6, help="number of IXI pairs in part b (default 6)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated, from {', '.join(JAX_METHODS)}, ants (default: {DEFAULT_METHODS})")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="output folder")
    p.add_argument("--data", default=None,
                   help="data root (default: $JAXREG_DATA, else ../shared/data relative to the repo root)")
    p.add_argument("--threads", type=int, default=2,
                   help="ITK threads for ANTs; the process is also pinned to this many cores (default 2)")
    p.add_argument("--parts", default="a,s,b", help="comma-separated subset of a,s,b (default: a,s,b)")
    p.add_argument("--brats-case", default="tcga_fg6692",
                   help="brats_space case of parts a and s (default tcga_fg6692; tumour Dice only if the case "
                        "has tumor_seg.nii.gz)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the known deformations (part a)")
    p.add_argument("--name", default="io_registration", help="stem of the output files (default io_registration)")
    p.add_argument("--dns-weights", default=None,
                   help="MASR-Net weights for io-dns (.safetensors; default: the shipped dns_brain)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="InstanceConfig override for the jaxreg methods (repeatable; VALUE a Python literal)")
    p.add_argument("--fast", action="store_true", help=argparse.SUPPRESS)  # debug: few iterations
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in JAX_METHODS + ("ants",)]
    if bad or not args.methods:
        p.error(f"unknown method(s) {bad}; choose from {', '.join(JAX_METHODS)}, ants")
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if not args.parts or any(s not in ("a", "s", "b") for s in args.parts):
        p.error(f"--parts must be a subset of a,s,b, got {args.parts}")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.data is None:
        args.data = os.environ.get("JAXREG_DATA") or str(REPO.parent / "shared" / "data")
    args.data = pathlib.Path(args.data)
    args.out = pathlib.Path(args.out)
    return args


def limit_threads(n: int) -> list[int]:
    """Give ANTs ``n`` ITK threads and pin the process (so also XLA) to ``n`` cores; before importing either."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(n)
    try:
        cpus = sorted(os.sched_getaffinity(0))
        if n < len(cpus):
            os.sched_setaffinity(0, cpus[:n])
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


# ----------------------------------------------------------------------------- small helpers

def finite(x):
    """JSON-safe float (NaN/Inf -> None)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def report_header(title: str, meta: dict, what: str) -> list[str]:
    """Markdown lines opening a results file: title with date and commit, machine, command, and the commands of
    the earlier runs whose rows the file keeps (``meta["earlier_runs"]``; ``what``: "methods", "variants", ...)."""
    lines = [f"# {title} ({meta['started']}, commit {meta['commit']})", "",
             f"Machine: {meta['machine']}", "", f"Command: `{meta['command']}`", ""]
    for e in meta.get("earlier_runs", []):
        lines += [f"Rows of other {what} from: `{e['command']}` ({e['started']}, commit {e['commit']})", ""]
    return lines


def earlier_runs(prev_meta: dict) -> list[dict]:
    """The ``earlier_runs`` of a results file being appended to: its own, plus the command, commit and start
    of the run that wrote it (what :func:`report_header` lists)."""
    return prev_meta.get("earlier_runs", []) + [
        {k: prev_meta[k] for k in ("command", "commit", "started") if k in prev_meta}]


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "") if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_hash() -> str:
    """sha256 (12 hex) of the jaxreg package sources: identifies the library state even when uncommitted."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((REPO / "jaxreg").rglob("*.py")):
        h.update(str(f.relative_to(REPO)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def regularity(disp_fixed, brain=None) -> dict:
    """% folding and SDlogJ over the whole grid, and SDlogJ inside ``brain`` (bool, fixed grid) if given."""
    import jax.numpy as jnp

    from jaxreg import metrics as M

    d = jnp.asarray(disp_fixed, jnp.float32)
    out = {"folding_percent": finite(M.folding_percent(d)), "sdlogj": finite(M.sdlogj(d))}
    if brain is not None:
        out["sdlogj_brain"] = finite(M.sdlogj(d, mask=jnp.asarray(brain)))
    return out


def label_scores(pred, target, labels, spacing, *, hd=True) -> dict:
    from jaxreg import metrics as M

    per = M.dice(np.asarray(pred, np.int32), np.asarray(target, np.int32), labels=labels)
    out = {"dice": finite(np.nanmean(per)), "dice30": finite(M.dice30(per))}
    if hd:
        out["hd95_mm"] = finite(np.nanmean(M.hd95(np.asarray(pred, np.int32), np.asarray(target, np.int32),
                                                   spacing=spacing, labels=labels)))
    return out


# ----------------------------------------------------------------------------- methods

def parse_overrides(items) -> dict:
    """``["relative_eps=1.0", "learning_rates=(0.02, 0.01, 0.006)", "similarity=ngf"]`` -> dict (values as Python
    literals; a value that is not one, such as ``ngf``, is taken as a string)."""
    import ast

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set needs KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


class Runner:
    """Runs one method on one pair of NIfTI files; returns the fixed-voxel map and timings."""

    def __init__(self, args):
        self.fast = args.fast
        self.overrides = parse_overrides(args.set)
        self.threads = args.threads
        self.compiled = {}  # method -> set of working-grid shapes already run in this process
        self.dns_weights = args.dns_weights
        self.features = {}  # method -> learned feature function (io-dns*), loaded once
        self.ants = None
        if "ants" in args.methods:
            import ants

            self.ants = ants
            if hasattr(ants, "config") and hasattr(ants.config, "_random_seed"):
                ants.config._random_seed = 1  # reproducible Mattes sampling (ANTs --random-seed)

    def config(self, method):
        from jaxreg.pipeline import config_for

        return config_for(method, **(FAST_JAX if self.fast else {}), **self.overrides)

    def run_jax(self, method, fixed, moving):
        """``(disp_fixed, info, reg)`` for a jaxreg method; ``fixed``/``moving`` are Volumes."""
        from jaxreg.pipeline import register_volumes, working_grid

        work_shape = tuple(working_grid(fixed.data.shape, fixed.affine, RESOLUTION)[0])
        seen = self.compiled.setdefault(method, set())
        first = work_shape not in seen
        t0 = time.perf_counter()
        if method not in self.features:
            from jaxreg.pipeline import feature_fn_for

            self.features[method] = feature_fn_for(method, self.dns_weights if method == "io-dns" else None)
        reg = register_volumes(fixed, moving, config=self.config(method), resolution=RESOLUTION,
                               feature_fn=self.features[method])
        wall = time.perf_counter() - t0
        seen.add(work_shape)
        info = {"wall_s": wall, "runtime_s": float(reg.runtime_s), "first_of_shape": first,
                "working_grid": list(work_shape)}
        return reg.disp_fixed, info, reg

    def run_ants(self, fixed_path, moving_path, workdir: pathlib.Path, fixed_affine, moving_affine):
        """``(disp_fixed, info, fwdtransforms)`` for ANTs SyN (Mattes MI)."""
        ants = self.ants
        f = ants.image_read(str(fixed_path))
        m = ants.image_read(str(moving_path))
        kw = FAST_ANTS if self.fast else {}
        prefix = str(workdir / "ants_")
        t0 = time.perf_counter()
        out = ants.registration(f, m, type_of_transform="SyN", aff_metric="mattes", syn_metric="mattes",
                                outprefix=prefix, **kw)
        wall = time.perf_counter() - t0
        disp_fixed = self.ants_dense(fixed_path, moving_path, out["fwdtransforms"], workdir / "ants_dense_",
                                     fixed_affine, moving_affine)
        info = {"wall_s": wall, "runtime_s": wall, "first_of_shape": False, "working_grid": list(f.shape)}
        return disp_fixed, info, out["fwdtransforms"]

    def ants_dense(self, fixed_path, moving_path, transforms, prefix, fixed_affine, moving_affine):
        """ANTs transforms composed into one dense map, as ``Registration.disp_fixed`` (fixed voxels)."""
        from jaxreg.compare import ants_dense_disp

        return ants_dense_disp(self.ants, fixed_path, moving_path, transforms, prefix, fixed_affine, moving_affine)

    def ants_labels(self, fixed_path, labels_path, transforms):
        from jaxreg.compare import ants_warp_labels

        return ants_warp_labels(self.ants, fixed_path, labels_path, transforms)


def affine_stage_matrix(reg, fixed):
    """jaxreg's affine stage (``Registration.matrix``, working grid) as a fixed-voxel -> fixed-voxel matrix."""
    from jaxreg.pipeline import working_grid

    _, work_affine, _ = working_grid(fixed.data.shape, fixed.affine, RESOLUTION)
    w = np.linalg.solve(work_affine, fixed.affine)  # fixed voxel -> working voxel
    return np.linalg.inv(w) @ np.asarray(reg.matrix, np.float64) @ w


def affine_stage_labels(reg, labels, fixed):
    """Moving labels on the fixed grid through the jaxreg affine stage only."""
    from jaxreg.io import resample_to_grid

    return resample_to_grid(labels.data, labels.affine, fixed.data.shape, fixed.affine, order=0,
                            matrix=affine_stage_matrix(reg, fixed))


def affine_stage_disp(reg, fixed):
    """Displacement (fixed voxels) of jaxreg's affine stage only."""
    from jaxreg.spatial import identity_grid

    m = affine_stage_matrix(reg, fixed)
    x = np.asarray(identity_grid(fixed.data.shape), np.float64)
    return (x @ m[:3, :3].T + m[:3, 3] - x).astype(np.float32)


# ----------------------------------------------------------------------------- part (a)

@functools.lru_cache(maxsize=None)
def _prepare_fixed(data: pathlib.Path, tmp: pathlib.Path, case: str):
    """The case's 2 mm fixed T1 (and tumour seg, if any) written once for parts a and s.

    Returns ``(t1, shape2, aff2, fixed_path, seg2, fixed_seg_path)``; the seg
    entries are None when the case has no ``tumor_seg.nii.gz``.
    """
    from jaxreg.data.pairs import to_grid as _to_grid
    from jaxreg.io import load_image, load_labels, resample_to_grid, save_image
    from jaxreg.pipeline import working_grid

    src = data / "brats_space" / case
    t1 = load_image(src / "t1.nii.gz")
    shape2, aff2, _ = working_grid(t1.data.shape, t1.affine, RESOLUTION)
    log(f"parts a/s: {src} {t1.data.shape} -> 2 mm grid {tuple(shape2)}")
    fixed_path = save_image(tmp / "a_fixed_t1.nii.gz", _to_grid(t1, shape2, aff2), aff2)
    seg2 = fixed_seg_path = None
    if (src / "tumor_seg.nii.gz").exists():
        seg = load_labels(src / "tumor_seg.nii.gz")
        seg2 = resample_to_grid(seg.data, seg.affine, shape2, aff2, order=0).astype(np.int32)
        fixed_seg_path = save_image(tmp / "a_fixed_seg.nii.gz", seg2.astype(np.uint8), aff2)
    return t1, shape2, aff2, fixed_path, seg2, fixed_seg_path


@functools.lru_cache(maxsize=None)
def _known_deformation(seed: int, shape: tuple):
    """``(disp, inverse_disp)`` numpy arrays of the seeded known deformation (the same in parts a and s)."""
    from jaxreg.data.pairs import known_deformation

    return known_deformation(seed, shape, mean_mm=DEFORM_MM, resolution=RESOLUTION, control_spacing=CONTROL_SPACING)


def prepare_part_a(data: pathlib.Path, tmp: pathlib.Path, seed: int, n_pairs: int, *, case: str = "tcga_fg6692",
                   synthetic: bool = False):
    """2 mm fixed T1, deformed moving images and segs written as NIfTI; returns the pair descriptions.

    ``synthetic``: the moving images are the T1 remapped by ``remap_intensity``
    (part s) instead of the real T2/FLAIR/T1c (part a); the seeds are the same.
    ``moving_seg`` / ``fixed_seg`` are None when the case has no tumour segmentation.
    """
    import jax.numpy as jnp

    from jaxreg.data.pairs import deform_native, remap_intensity, to_grid as _to_grid
    from jaxreg.io import Volume, load_image, save_image
    from jaxreg.spatial import warp_labels

    src = data / "brats_space" / case
    t1, shape2, aff2, fixed_path, seg2, fixed_seg_path = _prepare_fixed(data, tmp, case)
    tag = "s_" if synthetic else "a_"
    if synthetic:  # one remapped T1 (and one undeformed copy) serves every seed
        remapped = Volume(remap_intensity(t1.data), t1.affine)
        undeformed_path = save_image(tmp / "s_undeformed.nii.gz", _to_grid(remapped, shape2, aff2), aff2)
    pairs = []
    for i, name in enumerate(CONTRASTS[:n_pairs]):
        if synthetic:
            c1, name = remapped, f"sin(t1)#{i}"
        else:
            c1 = load_image(src / f"{name}.nii.gz")
            undeformed_path = save_image(tmp / f"a_undeformed_{i}.nii.gz", _to_grid(c1, shape2, aff2), aff2)
        s = seed + i
        disp, inv = _known_deformation(s, tuple(shape2))
        moving = _to_grid(deform_native(c1, inv, aff2), shape2, aff2)
        stem = f"{tag}moving_{i}"
        mseg_path = None
        if seg2 is not None:
            mseg = np.asarray(warp_labels(jnp.asarray(seg2), jnp.asarray(inv))).astype(np.uint8)
            mseg_path = save_image(tmp / f"{stem}_seg.nii.gz", mseg, aff2)
        pairs.append({
            "pair": f"t1<-{name}", "contrast": name, "seed": s,
            "fixed": fixed_path, "fixed_seg": fixed_seg_path,
            "moving": save_image(tmp / f"{stem}.nii.gz", moving, aff2),
            "moving_seg": mseg_path,
            "undeformed": undeformed_path,
            "disp_true": disp,
        })
    return pairs


def run_part_a(args, runner, tmp, record, *, synthetic=False):
    """Part a (real contrasts) or, with ``synthetic``, part s (remapped T1); rows of parts ``a``/``a-floor`` or ``s``/``s-floor``."""
    from jaxreg import metrics as M
    from jaxreg.io import load_image, load_labels
    from jaxreg.pipeline import warp_labels_to_fixed
    from jaxreg.spatial import voxel_spacing

    part = "s" if synthetic else "a"
    pairs = prepare_part_a(args.data, tmp, args.seed, 1 if args.quick else len(CONTRASTS), case=args.brats_case,
                           synthetic=synthetic)
    for k, p in enumerate(pairs):
        fixed, moving = load_image(p["fixed"]), load_image(p["moving"])
        has_seg = p["fixed_seg"] is not None
        fseg = load_labels(p["fixed_seg"]) if has_seg else None
        mseg = load_labels(p["moving_seg"]) if has_seg else None
        spacing = voxel_spacing(fixed.affine)[:3]
        brain = fixed.data > 0
        truth = p["disp_true"]
        before = M.endpoint_error_stats(np.zeros_like(truth), truth, spacing=spacing, mask=brain)
        tum_before = label_scores(mseg.data, fseg.data, TUMOUR_LABELS, spacing, hd=False)["dice"] if has_seg else None
        log(f"part {part} pair {k + 1}/{len(pairs)} {p['pair']} (seed {p['seed']}): EPE before "
            f"{before['mean']:.2f} mm (p95 {before['p95']:.2f}), tumour Dice before {_f(tum_before, '{:.3f}')}")
        for method in args.methods:
            workdir = pathlib.Path(tempfile.mkdtemp(prefix="ants_", dir=tmp))
            if method == "ants":
                disp, info, tx = runner.run_ants(p["fixed"], p["moving"], workdir, fixed.affine, moving.affine)
                warped_seg = runner.ants_labels(p["fixed"], p["moving_seg"], tx) if has_seg else None
                disp_affine = runner.ants_dense(p["fixed"], p["moving"], [t for t in tx if t.endswith(".mat")],
                                                workdir / "ants_affine_", fixed.affine, moving.affine)
            else:
                disp, info, reg = runner.run_jax(method, fixed, moving)
                warped_seg = warp_labels_to_fixed(mseg, fixed, reg) if has_seg else None
                disp_affine = affine_stage_disp(reg, fixed)
            after = M.endpoint_error_stats(disp, truth, spacing=spacing, mask=brain)
            aff = M.endpoint_error_stats(disp_affine, truth, spacing=spacing, mask=brain)
            row = {"part": part, "pair": p["pair"], "pair_index": k, "method": method, "seed": p["seed"],
                   "epe_mean_before_mm": before["mean"], "epe_p95_before_mm": before["p95"],
                   "epe_mean_mm": after["mean"], "epe_p95_mm": after["p95"], "epe_median_mm": after["median"],
                   "epe_reduction_percent": 100.0 * (1.0 - after["mean"] / before["mean"]),
                   "epe_mean_affine_stage_mm": aff["mean"],
                   "tumour_dice_before": tum_before,
                   "tumour_dice": (label_scores(warped_seg, fseg.data, TUMOUR_LABELS, spacing, hd=False)["dice"]
                                   if has_seg else None),
                   **regularity(disp, brain), **info}
            record(row)
            log(f"  {method:8s} EPE {row['epe_mean_mm']:.2f} mm (affine stage {aff['mean']:.2f}; "
                f"p95 {row['epe_p95_mm']:.2f}, "
                f"{row['epe_reduction_percent']:.0f} % reduction), tumour Dice {_f(row['tumour_dice'], '{:.3f}')}, "
                f"folding {row['folding_percent']:.3f} %, SDlogJ {row['sdlogj']:.3f}, "
                f"{info['wall_s']:.1f} s{' (incl. compile)' if info['first_of_shape'] else ''}")
            _rmtree(workdir)
        # Floor: the same registration of the undeformed contrast (truth: identity). Part s: the
        # undeformed remapped T1 is the same image for every seed, so once.
        if synthetic and k > 0:
            continue
        undeformed = load_image(p["undeformed"])
        floor = {}
        for method in args.methods:
            workdir = pathlib.Path(tempfile.mkdtemp(prefix="ants_", dir=tmp))
            if method == "ants":
                disp, info, _ = runner.run_ants(p["fixed"], p["undeformed"], workdir, fixed.affine,
                                                undeformed.affine)
            else:
                disp, info, _ = runner.run_jax(method, fixed, undeformed)
            floor[method] = (np.asarray(disp, np.float32), info)
            _rmtree(workdir)
        # What the methods agree on (their mean field) is misalignment in the data or a bias they
        # share; what each adds to it is its own noise.
        consensus = np.mean([d for d, _ in floor.values()], axis=0)
        consensus_mm = M.endpoint_error_stats(consensus, np.zeros_like(consensus), spacing=spacing, mask=brain)
        for method, (disp, info) in floor.items():
            err = M.endpoint_error_stats(disp, np.zeros_like(disp), spacing=spacing, mask=brain)
            dev = M.endpoint_error_stats(disp, consensus, spacing=spacing, mask=brain)
            row = {"part": f"{part}-floor", "pair": p["pair"], "pair_index": k, "method": method,
                   "disp_mean_mm": err["mean"], "disp_p95_mm": err["p95"],
                   "disp_mean_vector_mm": [float(v) for v in (disp[brain] * spacing).mean(axis=0)],
                   "consensus_mean_mm": consensus_mm["mean"], "minus_consensus_mean_mm": dev["mean"],
                   **regularity(disp), **info}
            record(row)
            log(f"  floor {method:8s} undeformed pair: mean |disp| {err['mean']:.2f} mm (p95 {err['p95']:.2f}; "
                f"mean vector {np.round(row['disp_mean_vector_mm'], 2).tolist()} mm; from the methods' mean "
                f"field {dev['mean']:.2f} mm, which is {consensus_mm['mean']:.2f} mm), {info['wall_s']:.1f} s")


# ----------------------------------------------------------------------------- part (b)

def ixi_pairs(data: pathlib.Path, n_pairs: int):
    src = data / "ixi"
    subjects = sorted(p.name[: -len("_t1.nii.gz")] for p in src.glob("*_t1.nii.gz"))
    if len(subjects) < 2:
        raise FileNotFoundError(f"{src}: need at least two <id>_t1.nii.gz scans, found {subjects}")
    out = []
    for i in range(min(n_pairs, len(subjects) - 1)):
        mov, fix = subjects[i], subjects[i + 1]
        out.append({"pair": f"{mov}->{fix}", "moving_id": mov, "fixed_id": fix,
                    "moving": src / f"{mov}_t1.nii.gz", "moving_labels": src / f"{mov}_labels.nii.gz",
                    "fixed": src / f"{fix}_t1.nii.gz", "fixed_labels": src / f"{fix}_labels.nii.gz"})
    return out


def run_part_b(args, runner, tmp, record):
    from jaxreg.data.pairs import remap_intensity
    from jaxreg.io import Volume, load_image, load_labels, resample_to_grid, save_image
    from jaxreg.pipeline import warp_labels_to_fixed
    from jaxreg.spatial import voxel_spacing

    pairs = ixi_pairs(args.data, 1 if args.quick else args.ixi_pairs)
    for variant in ("mono", "cross"):
        part = f"b-{variant}"
        for k, p in enumerate(pairs):
            fixed = load_image(p["fixed"])
            fixed_path = p["fixed"]
            if variant == "cross":
                fixed = Volume(remap_intensity(fixed.data), fixed.affine, fixed.header)
                fixed_path = save_image(tmp / f"b_fixed_remapped_{p['fixed_id']}.nii.gz", fixed.data,
                                        fixed.affine, overwrite=True)
                fixed = load_image(fixed_path)
            moving = load_image(p["moving"])
            flab, mlab = load_labels(p["fixed_labels"]), load_labels(p["moving_labels"])
            labels = [int(v) for v in np.union1d(np.unique(flab.data), np.unique(mlab.data)) if v != 0]
            spacing = voxel_spacing(fixed.affine)[:3]
            ident = resample_to_grid(mlab.data, mlab.affine, flab.data.shape, flab.affine, order=0)
            base = label_scores(ident, flab.data, labels, spacing)
            log(f"{part} pair {k + 1}/{len(pairs)} {p['pair']}: {len(labels)} labels, identity Dice "
                f"{base['dice']:.3f}, HD95 {base['hd95_mm']:.2f} mm")
            for method in args.methods:
                workdir = pathlib.Path(tempfile.mkdtemp(prefix="ants_", dir=tmp))
                if method == "ants":
                    disp, info, tx = runner.run_ants(fixed_path, p["moving"], workdir, fixed.affine, moving.affine)
                    warped = runner.ants_labels(fixed_path, p["moving_labels"], tx)
                    affine_only = runner.ants_labels(fixed_path, p["moving_labels"],
                                                     [t for t in tx if t.endswith(".mat")])
                else:
                    disp, info, reg = runner.run_jax(method, fixed, moving)
                    warped = warp_labels_to_fixed(mlab, fixed, reg)
                    affine_only = affine_stage_labels(reg, mlab, fixed)
                scores = label_scores(warped, flab.data, labels, spacing)
                row = {"part": part, "pair": p["pair"], "pair_index": k, "method": method, "n_labels": len(labels),
                       "dice_identity": base["dice"], "dice30_identity": base["dice30"],
                       "hd95_identity_mm": base["hd95_mm"],
                       "dice_affine_stage": label_scores(affine_only, flab.data, labels, spacing, hd=False)["dice"],
                       **scores, **regularity(disp, flab.data > 0), **info}
                record(row)
                log(f"  {method:8s} Dice {row['dice']:.3f} (affine stage {row['dice_affine_stage']:.3f}), "
                    f"Dice30 {row['dice30']:.3f}, HD95 {row['hd95_mm']:.2f} mm, folding "
                    f"{row['folding_percent']:.3f} %, SDlogJ {row['sdlogj']:.3f}, {info['wall_s']:.1f} s"
                    f"{' (incl. compile)' if info['first_of_shape'] else ''}")
                _rmtree(workdir)


def _rmtree(path: pathlib.Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- summaries and reports

A_KEYS = ("epe_mean_before_mm", "epe_mean_affine_stage_mm", "epe_mean_mm", "epe_p95_before_mm", "epe_p95_mm",
          "epe_reduction_percent", "tumour_dice_before", "tumour_dice", "folding_percent", "sdlogj", "sdlogj_brain")
FLOOR_KEYS = ("disp_mean_mm", "disp_p95_mm", "consensus_mean_mm", "minus_consensus_mean_mm", "folding_percent", "sdlogj")
B_KEYS = ("dice_identity", "dice_affine_stage", "dice", "dice30", "hd95_mm", "folding_percent", "sdlogj",
          "sdlogj_brain")


def add_ratios(rows):
    """``time_ratio_to_ants`` = jaxreg wall time / ANTs wall time on the same pair in this run."""
    ants = {(r["part"], r["pair"]): r["wall_s"] for r in rows if r["method"] == "ants"}
    for r in rows:
        t = ants.get((r["part"], r["pair"]))
        r["ants_wall_s"] = t
        r["time_ratio_to_ants"] = None if t is None else r["wall_s"] / t


def _mean(vals):
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def summarize(rows):
    out = {}
    for part in sorted({r["part"] for r in rows}):
        keys = {"a": A_KEYS, "s": A_KEYS, "a-floor": FLOOR_KEYS, "s-floor": FLOOR_KEYS}.get(part, B_KEYS)
        out[part] = {}
        for method in dict.fromkeys(r["method"] for r in rows if r["part"] == part):
            rs = [r for r in rows if r["part"] == part and r["method"] == method]
            steady = [r for r in rs if not r["first_of_shape"]]
            s = {"pairs": len(rs), **{k: _mean([r.get(k) for r in rs]) for k in keys}}
            s["wall_s_mean"] = _mean([r["wall_s"] for r in rs])
            s["wall_s_first"] = _mean([r["wall_s"] for r in rs if r["first_of_shape"]])
            s["wall_s_steady"] = _mean([r["wall_s"] for r in steady])
            s["runtime_s_mean"] = _mean([r["runtime_s"] for r in rs])
            s["runtime_s_steady"] = _mean([r["runtime_s"] for r in steady])
            s["time_ratio_to_ants"] = _mean([r["time_ratio_to_ants"] for r in rs])
            s["time_ratio_to_ants_steady"] = _mean([r["time_ratio_to_ants"] for r in steady])
            out[part][method] = s
    return out


def _f(x, fmt="{:.2f}"):
    return "–" if x is None else fmt.format(x)


def markdown(meta, rows, summary) -> str:
    L = [f"# jaxreg instance optimisation vs ANTs SyN at 2 mm (`benchmarks/io_registration.py`)", "",
         f"- machine: {meta['machine']}",
         f"- command: `{meta['command']}`",
         f"- started {meta['started']}, finished {meta.get('finished') or '(running)'}; commit {meta['commit']}, "
         f"jaxreg sources sha256 {meta['jaxreg_source_sha256']}"
         f"{'; **--fast: debug iterations, not a result**' if meta['fast'] else ''}"
         f"{'; --quick: 1 pair per part' if meta['quick'] else ''}",
         "- time = wall seconds of the registration call (jaxreg: `register_volumes`, incl. resampling; "
         "ANTs: `ants.registration`). *first* includes JAX compilation (first pair of a working-grid shape "
         "for that method in this process), *steady* = later pairs of the same shape. "
         "ratio = jaxreg time / ANTs time on the same pairs (< 1: jaxreg faster); *steady ratio* uses steady "
         "pairs only. opt = `Registration.runtime_s` (optimisation only).", ""]

    def t(x):
        return _f(x, "{:.1f}")

    case = meta["part_a"]["case"]
    titles = {
        "a": (f"## (a) Known deformation, real contrasts ({case}, fixed T1, moving T2/FLAIR/T1c warped "
              f"by a known SVF, mean {DEFORM_MM} mm)"),
        "s": (f"## (s) Known deformation, synthetic contrast ({case}, fixed T1, moving = the T1 remapped by "
              f"sin(0.9 pi x), warped by the same SVFs as (a): exact correspondence)"),
    }
    floor_titles = {
        "a": ("### (a) floor: the undeformed contrasts registered to T1 (truth: identity)",
              "Mean |disp| (mm) inside the brain found when nothing was deformed: residual misalignment of "
              "the co-registered BraTS contrasts plus each similarity's own bias. An EPE in the table above "
              "cannot be expected to fall much below this. "),
        "s": ("### (s) floor: the undeformed remapped T1 registered to T1 (truth: identity)",
              "Mean |disp| (mm) inside the brain when nothing was deformed and the anatomy is identical: "
              "each similarity's own cross-contrast bias. "),
    }
    for part in ("a", "s"):
        if part not in summary:
            continue
        L += [titles[part], "",
              "EPE in mm inside the brain (fixed T1 > 0), before -> after (% reduction of the mean; negative = "
              "worse than no registration). The true map has no affine part, so the affine stage alone should "
              "leave the EPE near its value before. "
              "Tumour Dice = mean over labels 1, 2, 4. Folding over the whole grid; SDlogJ over the whole grid / "
              "inside the brain.", "",
              "| method | pairs | EPE mean (mm) | EPE mean, affine stage only | EPE p95 (mm) | tumour Dice | "
              "% folding | SDlogJ | time first / steady (s) | opt (s) | ratio / steady ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m, s in summary[part].items():
            L.append(f"| {m} | {s['pairs']} | {_f(s['epe_mean_before_mm'])} -> {_f(s['epe_mean_mm'])} "
                     f"({_f(s['epe_reduction_percent'], '{:.0f}')} %) | {_f(s['epe_mean_affine_stage_mm'])} | "
                     f"{_f(s['epe_p95_before_mm'])} -> "
                     f"{_f(s['epe_p95_mm'])} | {_f(s['tumour_dice_before'], '{:.3f}')} -> "
                     f"{_f(s['tumour_dice'], '{:.3f}')} | {_f(s['folding_percent'], '{:.3f}')} | "
                     f"{_f(s['sdlogj'], '{:.3f}')} / {_f(s.get('sdlogj_brain'), '{:.3f}')} | "
                     f"{t(s['wall_s_first'])} / {t(s['wall_s_steady'])} | "
                     f"{t(s['runtime_s_mean'])} | {_f(s['time_ratio_to_ants'])} / "
                     f"{_f(s['time_ratio_to_ants_steady'])} |")
        L += ["", "Per pair:", "", "| pair | method | EPE mean (mm) | EPE p95 (mm) | tumour Dice | % folding | "
              "SDlogJ | time (s) | ratio |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["part"] == part:
                L.append(f"| {r['pair']} | {r['method']} | {_f(r['epe_mean_before_mm'])} -> {_f(r['epe_mean_mm'])} | "
                         f"{_f(r['epe_p95_before_mm'])} -> {_f(r['epe_p95_mm'])} | "
                         f"{_f(r['tumour_dice_before'], '{:.3f}')} -> {_f(r['tumour_dice'], '{:.3f}')} | "
                         f"{_f(r['folding_percent'], '{:.3f}')} | {_f(r['sdlogj'], '{:.3f}')} | "
                         f"{t(r['wall_s'])}{'*' if r['first_of_shape'] else ''} | {_f(r['time_ratio_to_ants'])} |")
        L += ["", "\\* incl. JAX compilation.", ""]
        fpart = f"{part}-floor"
        if fpart not in summary:
            continue
        title, text = floor_titles[part]
        L += [title, "",
              text + "*consensus* = the mean of all methods' fields "
              "(what they agree on: misalignment in the data or a bias they share; its mean length is the same "
              "for every row of a pair); *from consensus* = each method's own deviation from it.", "",
              "| method | pairs | mean disp (mm) | p95 (mm) | consensus (mm) | from consensus (mm) | "
              "per pair: mean disp, mean vector (mm) |",
              "|---|---|---|---|---|---|---|"]
        for m, s in summary[fpart].items():
            per = "; ".join(f"{r['pair']}: {_f(r['disp_mean_mm'])}, {[round(v, 2) for v in r['disp_mean_vector_mm']]}"
                            for r in rows if r["part"] == fpart and r["method"] == m)
            L.append(f"| {m} | {s['pairs']} | {_f(s['disp_mean_mm'])} | {_f(s['disp_p95_mm'])} | "
                     f"{_f(s.get('consensus_mean_mm'))} | {_f(s.get('minus_consensus_mean_mm'))} | {per} |")
        L.append("")
    for part, title in (("b-mono", "mono-contrast (T1 -> T1)"),
                        ("b-cross", "cross-contrast (fixed T1 remapped by sin(0.9 pi x))")):
        if part not in summary:
            continue
        L += [f"## (b) Inter-subject anatomy, IXI, {title}", "",
              "Dice = mean over the labels present in either scan (148 DLMUSE labels); identity = labels "
              "resampled through the NIfTI affines only; affine = the method's own affine stage only. "
              "HD95 = mean over labels of the 95th-percentile surface distance (mm). SDlogJ over the whole grid / "
              "inside the brain (fixed labels > 0).", "",
              "| method | pairs | Dice identity / affine / final | Dice30 | HD95 (mm) | % folding | SDlogJ | "
              "time first / steady (s) | opt (s) | ratio / steady ratio |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for m, s in summary[part].items():
            L.append(f"| {m} | {s['pairs']} | {_f(s['dice_identity'], '{:.3f}')} / "
                     f"{_f(s['dice_affine_stage'], '{:.3f}')} / **{_f(s['dice'], '{:.3f}')}** | "
                     f"{_f(s['dice30'], '{:.3f}')} | {_f(s['hd95_mm'])} | {_f(s['folding_percent'], '{:.3f}')} | "
                     f"{_f(s['sdlogj'], '{:.3f}')} / {_f(s.get('sdlogj_brain'), '{:.3f}')} | "
                     f"{t(s['wall_s_first'])} / {t(s['wall_s_steady'])} | "
                     f"{t(s['runtime_s_mean'])} | {_f(s['time_ratio_to_ants'])} / "
                     f"{_f(s['time_ratio_to_ants_steady'])} |")
        L += ["", "Per pair:", "", "| pair | method | Dice | Dice30 | HD95 (mm) | % folding | SDlogJ | time (s) | "
              "ratio |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["part"] == part:
                L.append(f"| {r['pair']} | {r['method']} | {_f(r['dice'], '{:.3f}')} | {_f(r['dice30'], '{:.3f}')} | "
                         f"{_f(r['hd95_mm'])} | {_f(r['folding_percent'], '{:.3f}')} | {_f(r['sdlogj'], '{:.3f}')} | "
                         f"{t(r['wall_s'])}{'*' if r['first_of_shape'] else ''} | {_f(r['time_ratio_to_ants'])} |")
        L += ["", "\\* incl. JAX compilation.", ""]
    return "\n".join(L) + "\n"


def main(argv=None):
    args = parse_args(argv)
    cpus = limit_threads(args.threads)  # before jax / ants are imported
    import jax

    sys.path.insert(0, str(REPO))
    try:
        import ants
        ants_version = getattr(ants, "__version__", "unknown")
    except ImportError:
        if "ants" in args.methods:
            raise SystemExit("antspyx is not installed: pip install antspyx, or leave ants out of --methods")
        ants_version = "not installed"
    if not args.data.is_dir():
        raise SystemExit(f"data folder {args.data} not found (set --data or $JAXREG_DATA)")
    args.out.mkdir(parents=True, exist_ok=True)

    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, REPO)
                                                if sys.executable.startswith(str(REPO)) else sys.executable,
                                                os.path.relpath(__file__, REPO), *sys.argv[1:]])
    meta = {
        "machine": f"{os.cpu_count()} CPUs visible, pinned to {len(cpus)} ({cpu_model()}); "
                   f"jax {jax.__version__} ({jax.default_backend()}); antspyx {ants_version}; "
                   f"ITK threads {args.threads}; Python {platform.python_version()}",
        "command": command, "commit": git_commit(), "jaxreg_source_sha256": source_hash(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "finished": None, "quick": args.quick, "fast": args.fast, "methods": args.methods, "parts": args.parts,
        "resolution_mm": RESOLUTION, "threads": args.threads, "cpu_count": os.cpu_count(), "pinned_cpus": cpus,
        "jax_version": jax.__version__, "antspyx_version": ants_version, "data": str(args.data),
        "part_a": {"case": f"brats_space/{args.brats_case}", "fixed": "t1", "moving": list(CONTRASTS),
                   "deformation": f"random_deformation(key(seed + i), mean_magnitude={DEFORM_MM / RESOLUTION} vox, "
                                  f"control_spacing={CONTROL_SPACING})", "brain_mask": "fixed T1 (2 mm) > 0"},
        "part_s": {"moving": "the fixed case's 1 mm T1 remapped by sin(0.9 pi x) (as part b), then deformed like part a"},
        "part_b": {"pairs": "moving = sorted subject i, fixed = subject i+1",
                   "cross_remap": "fixed := sin(0.9 pi x), x = clip(I / p99(I[I > 0]), 0, 1)"},
        "dns_weights": args.dns_weights or ("jaxreg/weights/dns_brain" if any(m.startswith("io-dns") for m in args.methods)
                                            else None),
        "fast_overrides": {"jaxreg": FAST_JAX, "ants": FAST_ANTS} if args.fast else None,
        "instance_overrides": parse_overrides(args.set),
    }
    log(f"io_registration: {meta['machine']}")
    log(f"command: {command}")
    rows = []
    json_path, md_path = args.out / f"{args.name}.json", args.out / f"{args.name}.md"

    def flush():
        add_ratios(rows)
        summary = summarize(rows)
        write_atomic(json_path, json.dumps({"meta": meta, "summary": summary,
                                            "rows": [{k: finite(v) if isinstance(v, float) else v
                                                      for k, v in r.items()} for r in rows]}, indent=1))
        write_atomic(md_path, markdown(meta, rows, summary))
        return summary

    def record(row):
        rows.append(row)
        flush()

    runner = Runner(args)
    with tempfile.TemporaryDirectory(prefix="jaxreg-bench-") as tmp:
        tmp = pathlib.Path(tmp)
        if "a" in args.parts:
            run_part_a(args, runner, tmp, record)
        if "s" in args.parts:
            run_part_a(args, runner, tmp, record, synthetic=True)
        if "b" in args.parts:
            run_part_b(args, runner, tmp, record)
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    flush()
    log(f"wrote {json_path} and {md_path}")
    print(md_path.read_text(), flush=True)


if __name__ == "__main__":
    main()
