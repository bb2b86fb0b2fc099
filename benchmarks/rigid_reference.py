#!/usr/bin/env python
"""Rigid, affine and default deformable registration of same-patient scans, scored against reference transforms.

Data: ``ms_native/patient01`` (one MS patient, two sessions 203 days apart,
raw scanner grids, with skull; see ``../shared/data/README.md``). Pairs:

* within a session, T1 -> FLAIR and T2 -> FLAIR (fixed = that session's
  FLAIR); reference: ``study{k}_{t1,t2}_to_flair.txt``;
* across sessions, FLAIR 2 -> FLAIR 1 and FLAIR 1 -> FLAIR 2; reference:
  ``T_moving o T_fixed^-1`` from ``study{k}_flair_to_common.txt``.

The reference files are ITK ``MatrixOffsetTransformBase`` affines in LPS mm
that map a fixed point to a moving point. Every method's result is turned
into the same thing, the moving world point of each fixed voxel (jaxreg:
``Registration.voxel_map_disp``; ANTs: its transforms composed by
``antsApplyTransforms`` into one dense warp on the fixed grid; headers: the
identity in world space), and scored by its distance (mm) from the
reference's point, over the head (fixed voxels above 10 % of the fixed
scan's 99th percentile, holes filled, largest component) where the reference
maps inside the moving scan's field of view. Reported: mean, median and 95th
percentile distance, and the wall time of the registration call.

Methods: ``header`` (no registration), ``rigid-floor`` (no registration either: the rigid map
nearest to the reference, least squares over the scored voxels; the references are affine with scales up
to 1.6 %, so this is about the least error a rigid method can have), ``jaxreg-rigid``, ``jaxreg-affine``,
``jaxreg-svf`` (``jaxreg register`` defaults: io-mind, svf, 2 mm),
``ants-rigid`` (``ants.registration(type_of_transform='Rigid')``),
``ants-syn`` (``'SyN'``, Mattes MI as benchmarks/io_registration.py).

Usage::

    .venv/bin/python benchmarks/rigid_reference.py                 # all pairs and methods (~10 min on 2 cores)
    .venv/bin/python benchmarks/rigid_reference.py --methods header,jaxreg-rigid --pairs s1_t1_flair

Writes ``<out>/rigid_reference.{json,md}`` (rewritten after every row).
"""
import argparse
import json
import os
import pathlib
import shlex
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from io_registration import (cpu_model, earlier_runs, finite, git_commit, limit_threads, log, parse_overrides,  # noqa: E402
                             report_header, source_hash, write_atomic)

METHODS = ("header", "rigid-floor", "jaxreg-rigid", "jaxreg-affine", "jaxreg-svf", "ants-rigid", "ants-syn")
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def pairs(root: pathlib.Path) -> dict:
    """name -> (fixed path, moving path, reference 4x4 RAS matrix fixed world -> moving world)."""
    p = root / "ms_native" / "patient01"
    out = {}
    for k in (1, 2):
        for c in ("t1", "t2"):
            out[f"s{k}_{c}_flair"] = (p / f"study{k}_flair.nii.gz", p / f"study{k}_{c}.nii.gz",
                                      read_itk_affine(p / f"study{k}_{c}_to_flair.txt"))
    c1, c2 = (read_itk_affine(p / f"study{k}_flair_to_common.txt") for k in (1, 2))
    out["s2_s1_flair"] = (p / "study1_flair.nii.gz", p / "study2_flair.nii.gz", c2 @ np.linalg.inv(c1))
    out["s1_s2_flair"] = (p / "study2_flair.nii.gz", p / "study1_flair.nii.gz", c1 @ np.linalg.inv(c2))
    return out


def read_itk_affine(path: pathlib.Path) -> np.ndarray:
    """An ITK ``MatrixOffsetTransformBase_double_3_3`` text file as a 4x4 RAS world -> world matrix.

    ITK: ``T(p) = M (p - c) + c + t`` in LPS, with ``Parameters`` = M (row
    major) then t, and ``FixedParameters`` = c.
    """
    params = fixed = None
    for line in path.read_text().splitlines():
        if line.startswith("Parameters:"):
            params = np.array(line.split(":", 1)[1].split(), np.float64)
        elif line.startswith("FixedParameters:"):
            fixed = np.array(line.split(":", 1)[1].split(), np.float64)
    if params is None or fixed is None or params.size != 12 or fixed.size != 3:
        raise ValueError(f"{path}: not a 3D ITK MatrixOffsetTransformBase text file")
    m, t, c = params[:9].reshape(3, 3), params[9:], fixed
    lps = np.eye(4)
    lps[:3, :3] = m
    lps[:3, 3] = c + t - m @ c
    return LPS @ lps @ LPS


def head_mask(data: np.ndarray) -> np.ndarray:
    import scipy.ndimage as ndi

    x = np.asarray(data, np.float32)
    m = x > 0.1 * np.percentile(x, 99)
    m = ndi.binary_fill_holes(ndi.binary_opening(m, iterations=1))
    lab, n = ndi.label(m)
    if n > 1:
        sizes = ndi.sum(m, lab, range(1, n + 1))
        m = lab == (1 + int(np.argmax(sizes)))
    return m


def scored_points(fixed, moving, reference):
    """``(x, world, ref, mask)``: fixed voxel grid, its world points, the reference's moving points, scored voxels
    (computed once per pair; :func:`score` and :func:`rigid_floor_map` take it)."""
    from jaxreg.spatial import identity_grid

    shape = fixed.data.shape
    x = np.asarray(identity_grid(shape), np.float64)
    world = x @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]
    ref = world @ reference[:3, :3].T + reference[:3, 3]
    inv_m = np.linalg.inv(moving.affine)
    ref_vox = ref @ inv_m[:3, :3].T + inv_m[:3, 3]
    inside = np.all((ref_vox >= 0) & (ref_vox <= np.asarray(moving.data.shape) - 1), axis=-1)
    return x, world, ref, head_mask(fixed.data) & inside


def rigid_floor_map(moving, points):
    """The rigid map nearest to the (affine) reference: least squares over the scored voxels
    (:func:`jaxreg.spatial.fit_rigid`, in float64).

    No rigid method can be much closer to the reference than this (it minimises the squared, not the mean,
    distance); the gap is the reference's own scaling and shear. Returns the fixed-voxel map displacement.
    """
    import jax

    from jaxreg.spatial import fit_rigid

    x, world, ref, mask = points
    with jax.enable_x64(True):
        m = np.asarray(fit_rigid(jax.numpy.asarray(world[mask]), jax.numpy.asarray(ref[mask])), np.float64)
    moved = world @ m[:3, :3].T + m[:3, 3]
    inv_m = np.linalg.inv(moving.affine)
    return moved @ inv_m[:3, :3].T + inv_m[:3, 3] - x


def score(voxel_map_disp, moving, points) -> dict:
    """Distances (mm) between the method's and the reference's moving world point of each head voxel
    (``points``: :func:`scored_points` of the pair)."""
    x, _, ref, mask = points
    y = x + np.asarray(voxel_map_disp, np.float64)  # moving voxels
    est = y @ moving.affine[:3, :3].T + moving.affine[:3, 3]
    dist = np.linalg.norm(est - ref, axis=-1)[mask]
    return {"mean_mm": finite(dist.mean()), "median_mm": finite(np.median(dist)),
            "p95_mm": finite(np.percentile(dist, 95)), "max_mm": finite(dist.max()), "voxels": int(mask.sum())}


def header_map(fixed, moving):
    from jaxreg.io import grid_to_grid_matrix
    from jaxreg.spatial import identity_grid

    g = grid_to_grid_matrix(fixed.affine, moving.affine)
    x = np.asarray(identity_grid(fixed.data.shape), np.float64)
    return x @ g[:3, :3].T + g[:3, 3] - x


_SEEN = set()


def run_jaxreg(method, fixed, moving, overrides=None, resolution="auto"):
    from jaxreg.pipeline import config_for, register_volumes, working_grid

    transform = method.split("-", 1)[1]
    key = (method, tuple(working_grid(fixed.data.shape, fixed.affine, resolution, transform)[0]))
    first = key not in _SEEN
    _SEEN.add(key)
    t0 = time.perf_counter()
    reg = register_volumes(fixed, moving, config=config_for("io-mind", transform=transform, **(overrides or {})),
                           resolution=resolution)
    wall = time.perf_counter() - t0
    return reg.voxel_map_disp, {"wall_s": wall, "runtime_s": float(reg.runtime_s), "first_of_shape": first}


def run_ants(method, fixed_path, moving_path, moving, workdir):
    import ants

    from jaxreg.io import load_itk_warp, world_warp_to_voxel_disp

    f, m = ants.image_read(str(fixed_path)), ants.image_read(str(moving_path))
    kw = dict(type_of_transform="Rigid") if method == "ants-rigid" else dict(
        type_of_transform="SyN", aff_metric="mattes", syn_metric="mattes")
    t0 = time.perf_counter()
    out = ants.registration(f, m, outprefix=str(workdir / f"{method}_"), **kw)
    wall = time.perf_counter() - t0
    comp = ants.apply_transforms(f, m, list(out["fwdtransforms"]), compose=str(workdir / f"{method}_dense_"))
    d_lps, warp_affine = load_itk_warp(comp)
    return world_warp_to_voxel_disp(d_lps, warp_affine, moving.affine), {"wall_s": wall, "runtime_s": wall}


def markdown(meta, rows) -> str:
    lines = report_header("rigid_reference", meta, "methods") + [
             "Distance (mm) of each fixed head voxel's moving point from the reference transform's "
             "(mean / p95), and wall time of the registration call (s; * = first call on that working-grid "
             "shape in the process, so it includes XLA compilation). *rigid-floor*: the rigid map nearest to the "
             "reference (least squares over the same voxels), no registration: the references are affine, so "
             "no rigid method can be much closer than this.", "",
             "| pair | " + " | ".join(meta["methods"]) + " |", "|---|" + "---|" * len(meta["methods"])]
    by = {(r["pair"], r["method"]): r for r in rows}
    for p in meta["pairs"]:
        cells = []
        for m in meta["methods"]:
            r = by.get((p, m))
            if r is None:
                cells.append("")
            else:
                t = "" if r.get("wall_s") is None else f", {r['wall_s']:.1f} s" + ("*" if r.get("first_of_shape") else "")
                cells.append(f"{r['mean_mm']:.2f} / {r['p95_mm']:.2f}{t}")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    means = []
    for m in meta["methods"]:
        v = [by[(p, m)]["mean_mm"] for p in meta["pairs"] if (p, m) in by]
        means.append(f"{np.mean(v):.2f}" if v else "")
    lines.append("| **mean** | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--pairs", default=None, help="comma-separated pair names (default: all)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--name", default="rigid_reference")
    p.add_argument("--data", default=os.environ.get("JAXREG_DATA") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--append", action="store_true",
                   help="keep the rows of other methods already in <out>/<name>.json (e.g. ANTs, run separately)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="InstanceConfig override for the jaxreg methods (repeatable; VALUE a Python literal)")
    p.add_argument("--resolution", type=float, default=None,
                   help="jaxreg working-grid spacing (mm); default: what `jaxreg register` picks (pipeline."
                        "auto_resolution: 1 mm for rigid/affine, 2 mm for svf on these scans)")
    args = p.parse_args(argv)
    overrides = parse_overrides(args.set)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {METHODS}")
    cpus = limit_threads(args.threads)
    import jax

    from jaxreg.io import load_image

    all_pairs = pairs(pathlib.Path(args.data))
    names = list(all_pairs) if args.pairs is None else [s for s in args.pairs.split(",") if s]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{os.cpu_count()} CPUs, pinned to {len(cpus)} ({cpu_model()}); jax {jax.__version__}; "
                       f"ITK threads {args.threads}",
            "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/rigid_reference.py",
                                                          *sys.argv[1:]]),
            "commit": git_commit(), "jaxreg_source_sha256": source_hash(), "started": time.strftime("%Y-%m-%d %H:%M"),
            "methods": methods, "pairs": names}
    rows = []
    old = out / f"{args.name}.json"
    if args.append and old.exists():
        prev = json.loads(old.read_text())
        rows = [r for r in prev["rows"] if r["method"] not in methods]
        meta["methods"] = [m for m in METHODS if m in set(methods) | {r["method"] for r in rows}]
        meta["pairs"] = list(dict.fromkeys(prev["meta"]["pairs"] + names))
        meta["earlier_runs"] = earlier_runs(prev["meta"])

    def flush():
        write_atomic(out / f"{args.name}.json", json.dumps({"meta": meta, "rows": rows}, indent=1))
        write_atomic(out / f"{args.name}.md", markdown(meta, rows))

    with tempfile.TemporaryDirectory(prefix="jaxreg-rigid-") as tmp:
        for name in names:
            fixed_path, moving_path, reference = all_pairs[name]
            fixed, moving = load_image(fixed_path), load_image(moving_path)
            points = scored_points(fixed, moving, reference)
            for method in methods:
                if method == "header":
                    vmap, info = header_map(fixed, moving), {"wall_s": None, "runtime_s": None}
                elif method == "rigid-floor":
                    vmap = rigid_floor_map(moving, points)
                    info = {"wall_s": None, "runtime_s": None,
                            "reference_singular_values": np.linalg.svd(reference[:3, :3], compute_uv=False).tolist()}
                elif method.startswith("jaxreg"):
                    vmap, info = run_jaxreg(method, fixed, moving, overrides,
                                            "auto" if args.resolution is None else args.resolution)
                else:
                    vmap, info = run_ants(method, fixed_path, moving_path, moving, pathlib.Path(tmp))
                row = {"pair": name, "method": method, **score(vmap, moving, points), **info}
                rows.append(row)
                flush()
                log(f"{name} {method}: mean {row['mean_mm']:.3f} mm, p95 {row['p95_mm']:.3f} mm"
                    + ("" if info["wall_s"] is None else f", {info['wall_s']:.1f} s"))
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M")
    flush()
    print((out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
