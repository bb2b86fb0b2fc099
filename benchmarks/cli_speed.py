#!/usr/bin/env python
"""Whole-command speed of ``jaxreg register`` against an ANTs process doing the same job (issue 18).

For each real pair (five grid sizes from ``$JAXREG_DATA``) it times, as separate processes, from
launch to exit:

- **jaxreg cold**: ``jaxreg register --fixed F --moving M --out DIR --quiet`` (default method io-mind,
  2 mm) with an empty ``JAXREG_CACHE_DIR`` (a new folder per pair): start-up, reading, resampling,
  every XLA compilation, optimisation, metrics, writing and the QC figure;
- **jaxreg warm**: the same command again with that cache (``--overwrite``);
- **ANTs**: ``benchmarks/_ants_register.py`` (read, ``ants.registration`` SyN with Mattes MI, write
  the warped image, the composed warp and, where given, the warped labels), with
  ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` = the machine's cores.

It also checks the size classes: a crop of the brats T1/T2 pair (a different working grid in the
same :func:`jaxreg.optimize.instance.bucket_shape` class) runs with the brats pair's cache, and the
number of programs it adds to the cache is reported (0 = nothing compiled again); and, if
``--cohort``, one ``jaxreg register --moving a b c`` call over several moving scans.

Usage::

    .venv/bin/python benchmarks/cli_speed.py                  # ~15 min on 2 cores
    .venv/bin/python benchmarks/cli_speed.py --pairs ixi,brats --out /tmp/speed
    .venv/bin/python benchmarks/cli_speed.py --pairs ixi --repeat 5       # medians of 5 interleaved runs

Writes ``<out>/cli_speed.json`` and ``<out>/cli_speed.md`` (ratios jaxreg / ANTs, same run).
"""
import argparse
import compileall
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAIRS = {
    "ixi": dict(fixed="ixi/IXI012-HH-1211_t1.nii.gz", moving="ixi/IXI013-HH-1212_t1.nii.gz",
                fixed_labels="ixi/IXI012-HH-1211_labels.nii.gz", moving_labels="ixi/IXI013-HH-1212_labels.nii.gz",
                what="IXI T1 -> T1, two subjects, 148 labels"),
    "brats": dict(fixed="brats_space/tcga_fg6692/t1.nii.gz", moving="brats_space/tcga_fg6692/t2.nii.gz",
                  what="brats_space T2 -> T1, 1 mm SRI24"),
    "ixi002": dict(fixed="ixi_t2/IXI002/t1.nii.gz", moving="ixi_t2/IXI002/t2.nii.gz",
                   what="IXI002 T2 -> T1, own oblique grids"),
    "ms_mni": dict(fixed="ms_mni/patient07/t1.nii.gz", moving="ms_mni/patient07/flair.nii.gz",
                   what="ms_mni FLAIR -> T1, 1 mm MNI"),
    "native": dict(fixed="native/tcga_fg6692/t1.nii.gz", moving="native/tcga_fg6692/t2.nii.gz",
                   what="native TCGA T2 -> T1, 5.5 mm slices, own grids"),
}


# the instance optimiser's programs on the (bucketed) working grid; the others run on each scan's own grid
LEVEL_PROGRAMS = {"affine_pyramid", "affine_level", "level_features", "deformable_level", "finish_deformable",
                  "moving_fov", "binary_level_mask", "resample_affine"}


def _jaxreg_cmd(fixed, moving, out, extra=()):
    exe = pathlib.Path(sys.executable).with_name("jaxreg")
    return [str(exe), "register", "--fixed", str(fixed), *(["--moving"] + [str(m) for m in moving]),
            "--out", str(out), "--quiet", "--overwrite", *extra]


def _timed(cmd, env):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def _cache_entries(path):
    return sum(1 for p in pathlib.Path(path).rglob("*") if p.is_file())


def _crop_pair(data, tmp):
    """The brats T1/T2 pair cropped by 3-8 voxels per side (2 mm grid 114x114x74 instead of 120x120x78): a
    different grid in the same size class (128x128x80)."""
    import nibabel as nib
    import numpy as np

    out = []
    for name in ("t1", "t2"):
        img = nib.load(str(data / "brats_space" / "tcga_fg6692" / f"{name}.nii.gz"))
        lo = np.array([5, 6, 3])
        sl = tuple(slice(int(a), int(n - a - 2)) for a, n in zip(lo, img.shape))
        aff = img.affine.copy()
        aff[:3, 3] += aff[:3, :3] @ lo
        path = tmp / f"brats_crop_{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[sl], aff), str(path))
        out.append(path)
    return out


def _grids(fixed):
    import nibabel as nib

    from jaxreg.optimize.instance import bucket_shape
    from jaxreg.pipeline import working_grid

    img = nib.load(str(fixed))
    shape, _, _ = working_grid(img.shape[:3], img.affine, 2.0)
    return list(shape), list(bucket_shape(shape))


def _write(out, rows, extra, meta):
    out.mkdir(parents=True, exist_ok=True)
    (out / "cli_speed.json").write_text(json.dumps({"meta": meta, "rows": rows, **extra}, indent=2))
    lines = [f"# `jaxreg register` whole-command time vs an ANTs process ({meta['date']})", "",
             f"Command: `{meta['command']}` on commit {meta['commit']}, {meta['machine']}. "
             "Seconds from launch to exit of each process; ratio = jaxreg / ANTs on the same pair in this run. "
             "cold = empty `JAXREG_CACHE_DIR`; warm = the same command again with that cache. ANTs registers at "
             "each scan's own resolution (1 mm for brats, ixi002, ms_mni), jaxreg on its 2 mm working grid: only "
             "the ixi pair (2 mm scans) is the same job at the same resolution. With `--repeat N`: medians of N "
             "interleaved runs (range in brackets), ratios of the medians. jaxreg's bytecode is compiled before the "
             "timings, as an installed package has it.", "",
             "| pair | working grid | size class | jaxreg cold (s) | jaxreg warm (s) | ANTs (s) | cold ratio | "
             "warm ratio |", "|---|---|---|---|---|---|---|---|"]
    def cell(r, key):
        runs = r.get(key.replace("_s", "_runs")) or []
        spread = f" ({min(runs):.2f}-{max(runs):.2f})" if len(runs) > 1 else ""
        return f"{r[key]:.{2 if spread else 1}f}{spread}"

    for r in rows:
        lines.append(f"| {r['pair']} | {'x'.join(map(str, r['working_grid']))} | {'x'.join(map(str, r['bucket']))} "
                     f"| {cell(r, 'cold_s')} | {cell(r, 'warm_s')} | {cell(r, 'ants_s')} | "
                     f"{r['cold_s'] / r['ants_s']:.{3 if len(r.get('warm_runs', [])) > 1 else 2}f} | "
                     f"{r['warm_s'] / r['ants_s']:.{3 if len(r.get('warm_runs', [])) > 1 else 2}f} |")
    if rows:
        c, w, a = (sum(r[k] for r in rows) for k in ("cold_s", "warm_s", "ants_s"))
        lines.append(f"| **all** | | | {c:.1f} | {w:.1f} | {a:.1f} | **{c / a:.2f}** | **{w / a:.2f}** |")
    for key, value in extra.items():
        lines += ["", f"**{key}**: " + ", ".join(f"{k} {v}" for k, v in value.items())]
    (out / "cli_speed.md").write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated from {', '.join(PAIRS)}")
    ap.add_argument("--data", default=os.environ.get("JAXREG_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--no-ants", action="store_true", help="jaxreg only (ratios are then not computed)")
    ap.add_argument("--cohort", action="store_true", help="also time one --moving a b c call")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each timing per pair (cold with a new empty cache each time, warm, ANTs), "
                         "interleaved; the table gives medians and the ranges (default 1)")
    args = ap.parse_args()
    data, out = pathlib.Path(args.data), pathlib.Path(args.out)
    names = [p for p in args.pairs.split(",") if p]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    meta = {"command": " ".join([pathlib.Path(sys.argv[0]).name] + sys.argv[1:]), "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}"}
    rows, extra = [], {}
    # jaxreg's bytecode, as an installed package has it (pip compiles it at install, an editable install on the
    # first import): where PYTHONDONTWRITEBYTECODE is set (as on our machines) every run would compile the
    # sources again, ~0.07 s that ANTs, from site-packages, does not pay
    compileall.compile_dir(str(ROOT / "jaxreg"), quiet=1)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="cli_speed_"))
    base_env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(os.cpu_count())}
    try:
        for name in names:
            p = PAIRS[name]
            fixed, moving = data / p["fixed"], data / p["moving"]
            labels = []
            if "fixed_labels" in p:
                labels = ["--fixed-labels", str(data / p["fixed_labels"]), "--moving-labels",
                          str(data / p["moving_labels"])]
            colds, warms, antss = [], [], []
            for k in range(max(1, args.repeat)):  # interleaved, so drifts of the machine hit all three alike
                cache = tmp / f"cache_{name}" if k == 0 else tmp / f"cache_{name}_{k}"
                env = {**base_env, "JAXREG_CACHE_DIR": str(cache)}
                cmd = _jaxreg_cmd(fixed, [moving], tmp / f"out_{name}", labels)
                colds.append(_timed(cmd, env))
                if k == 0:
                    n_cold = _cache_entries(cache)
                warms.append(_timed(cmd, env))
                if not args.no_ants:
                    ants_cmd = [sys.executable, str(ROOT / "benchmarks" / "_ants_register.py"), str(fixed),
                                str(moving), str(tmp / f"ants_{name}")] + (
                        [str(data / p["moving_labels"])] if labels else [])
                    antss.append(_timed(ants_cmd, base_env))
            cache = tmp / f"cache_{name}"
            env = {**base_env, "JAXREG_CACHE_DIR": str(cache)}
            cold, warm = statistics.median(colds), statistics.median(warms)
            ants_s = statistics.median(antss) if antss else float("nan")
            metrics = json.loads((tmp / f"out_{name}" / "metrics.json").read_text())
            work, bucket = _grids(fixed)
            rows.append({"pair": name, "what": p["what"], "working_grid": work, "bucket": bucket, "cold_s": cold,
                         "warm_s": warm, "ants_s": ants_s, "cold_runs": colds, "warm_runs": warms,
                         "ants_runs": antss, "programs_cached_cold": n_cold,
                         "dice_mean": metrics.get("dice_mean"), "folding_percent": metrics["folding_percent"]})
            print(f"{name}: grid {work} -> {bucket}: cold {cold:.1f} s ({n_cold} programs), warm {warm:.1f} s, "
                  f"ANTs {ants_s:.1f} s", flush=True)
            _write(out, rows, extra, meta)
            if name == "brats":  # another grid in the same size class, with the brats pair's cache
                cf, cm = _crop_pair(data, tmp)
                before = _cache_entries(cache)
                stored = set((cache / "jaxreg-programs").glob("*.pkl"))
                crop_s = _timed(_jaxreg_cmd(cf, [cm], tmp / "out_crop"), env)
                work_c, bucket_c = _grids(cf)
                new = sorted(p.name.rsplit("-", 1)[0] for p in set((cache / "jaxreg-programs").glob("*.pkl")) - stored)
                level = [n for n in new if n in LEVEL_PROGRAMS]
                extra["same size class"] = {"cropped brats grid": "x".join(map(str, work_c)),
                                            "size class": "x".join(map(str, bucket_c)),
                                            "files added to the caches": _cache_entries(cache) - before,
                                            "level programs compiled again": len(level),
                                            "programs compiled again": ", ".join(new) or "none",
                                            "wall s": round(crop_s, 1)}
                print(f"crop: {extra['same size class']}", flush=True)
                _write(out, rows, extra, meta)
        if args.cohort:
            ixi = sorted((data / "ixi").glob("*_t1.nii.gz"))
            fixed, movings = ixi[0], ixi[1:5]
            env = {**base_env, "JAXREG_CACHE_DIR": str(tmp / "cache_cohort")}
            wall = _timed(_jaxreg_cmd(fixed, movings, tmp / "out_cohort"), env)
            extra["cohort"] = {"pairs": len(movings), "cold wall s": round(wall, 1),
                               "per pair s": round(wall / len(movings), 1)}
            print(f"cohort: {extra['cohort']}", flush=True)
            _write(out, rows, extra, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print((out / "cli_speed.md").read_text())


if __name__ == "__main__":
    main()
