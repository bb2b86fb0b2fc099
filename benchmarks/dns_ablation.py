#!/usr/bin/env python
"""DNS ablations (issue 12; DNS / MASR-Net, Mok et al. 2024, Table 5): neighbourhood layout and Bezier inversion.

Each variant is a ``configs/dns_brain.py`` training run with one setting
changed at the same step budget. This script reads each run's held-out
validation metrics from its ``metrics.jsonl``: InfoNCE and top-1 retrieval
over 4096 locations of brats_space/tcga_fg6692 and IXI012, neither of which
is trained on. It exports the run's weights and registers with them
(io-dns, through ``benchmarks/io_registration.py``):

* part (a): real contrasts, known deformations;
* part (s): a synthetic contrast;
* part (b): IXI mono- and cross-contrast pairs.

It writes one table.

Usage (the runs are those of the session-20 ablation, 500 steps each)::

    S="--config.num_train_steps=500 --config.eval_every=250"
    .venv/bin/python -m train.main --config configs/dns_brain.py $S --workdir runs/abl/dual_inv
    ... $S --config.model.dilations="(1,)" --workdir runs/abl/single_inv
    ... $S --config.model.invert_prob=0.0 --workdir runs/abl/dual_noinv
    .venv/bin/python benchmarks/dns_ablation.py --run "dual, inversion=runs/abl/dual_inv" \\
        --run "single, inversion=runs/abl/single_inv" --run "dual, no inversion=runs/abl/dual_noinv"

Writes ``<out>/<name>.{json,md}`` (default ``benchmarks/results/dns_ablation``).
"""
import argparse
import json
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import io_registration  # noqa: E402
from io_registration import cpu_model, earlier_runs, git_commit, report_header, write_atomic  # noqa: E402


def validation_metrics(run_dir: pathlib.Path) -> dict:
    """The last logged ``val_*`` values of a training run, with their step (empty if it never validated)."""
    last = {}
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training run's workdir?")
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        vals = {k: v for k, v in rec.items() if k.startswith("val_")}
        if vals:
            last = {"step": rec["step"], **vals}
    return last


def run_settings(run_dir: pathlib.Path) -> dict:
    cfg = json.loads((run_dir / "config.json").read_text())
    m = cfg["model"]
    return {"dilations": list(m["dilations"]), "invert_prob": m["invert_prob"], "steps": cfg["num_train_steps"]}


def evaluate(name, run_dir, args, tmp) -> dict:
    from jaxreg.weights import export_run

    slug = "".join(c if c.isalnum() else "_" for c in name)
    st, js = export_run(str(run_dir), str(tmp / slug))
    step = json.loads(pathlib.Path(js).read_text())["training"]["step"]
    stem = "reg_" + slug
    argv = ["--methods", "io-dns", "--dns-weights", str(st), "--out", str(tmp), "--name", stem,
            "--ixi-pairs", str(args.ixi_pairs), "--parts", args.parts, "--threads", str(args.threads)]
    if args.quick:
        argv.append("--quick")
    io_registration.main(argv)
    summary = json.loads((tmp / f"{stem}.json").read_text())["summary"]
    row = {"run": str(run_dir), **run_settings(run_dir), "weights_step": step,
           "validation": validation_metrics(run_dir)}
    for part in ("a", "s"):
        if part in summary:
            s = summary[part]["io-dns"]
            row[f"epe_{part}_before_mm"] = s["epe_mean_before_mm"]
            row[f"epe_{part}_mm"] = s["epe_mean_mm"]
            row[f"folding_{part}"] = s["folding_percent"]
    for part in ("b-mono", "b-cross"):
        if part in summary:
            row[f"dice_{part[2:]}"] = summary[part]["io-dns"]["dice"]
            row[f"folding_{part[2:]}"] = summary[part]["io-dns"]["folding_percent"]
    return row


def markdown(meta, rows) -> str:
    def f(v, fmt=".3f"):
        return "–" if v is None else format(v, fmt)

    lines = report_header("dns_ablation", meta, "variants") + [
        "Each row is one `configs/dns_brain.py` training run. Only the setting named in the row differs, and "
        "every run has the same step budget. *val* = held-out InfoNCE (log 4096 = 8.3 is chance) and top-1 "
        "retrieval at the run's last validation. EPE = mean endpoint error (mm) of io-dns on "
        "benchmarks/io_registration.py part (a), real contrasts, and part (s), a synthetic contrast. "
        "Dice = IXI mono / cross (part b). Folding = the most % of voxels with a negative Jacobian "
        "determinant over all parts.", "",
        "| variant | layout (dilations) | inversion delta | weights' step / run's steps | val InfoNCE / top-1 | EPE a (mm) | "
        "EPE s (mm) | IXI Dice mono / cross | % folding |",
        "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        v = r["validation"]
        fold = max([r[k] for k in r if k.startswith("folding_")] or [0.0])
        lines.append(
            f"| {name} | {tuple(r['dilations'])} | {r['invert_prob']:g} | {r['weights_step']} / {r['steps']} | "
            f"{f(v.get('val_infonce'), '.2f')} / {f(v.get('val_top1'))} | "
            f"{f(r.get('epe_a_before_mm'), '.2f')} -> **{f(r.get('epe_a_mm'), '.2f')}** | "
            f"{f(r.get('epe_s_before_mm'), '.2f')} -> **{f(r.get('epe_s_mm'), '.2f')}** | "
            f"{f(r.get('dice_mono'))} / {f(r.get('dice_cross'))} | {fold:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="NAME=DIR",
                   help="a variant's name and its training workdir (repeatable)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="output folder")
    p.add_argument("--name", default="dns_ablation", help="stem of the output files")
    p.add_argument("--ixi-pairs", type=int, default=2, help="IXI pairs in part b (default 2)")
    p.add_argument("--parts", default="a,s,b", help="parts of benchmarks/io_registration.py (default a,s,b)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1 pair per part")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of other variants already in <out>/<name>.json (variants evaluated in turn)")
    args = p.parse_args(argv)
    runs = {}
    for spec in args.run:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            p.error(f"--run expects NAME=DIR, got {spec!r}")
        path = pathlib.Path(path)
        if not (path / "config.json").exists():
            p.error(f"{path} is not a training run (no config.json)")
        runs[name] = path
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": cpu_model(), "commit": git_commit(), "started": time.strftime("%Y-%m-%d %H:%M"),
            "command": " ".join(["benchmarks/dns_ablation.py"] + [a if " " not in a else f'"{a}"'
                                                                   for a in (argv or sys.argv[1:])])}
    rows, old = {}, out / f"{args.name}.json"
    if args.append and old.exists():
        prev = json.loads(old.read_text())
        rows = {k: v for k, v in prev["rows"].items() if k not in runs}
        meta["earlier_runs"] = earlier_runs(prev["meta"])
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in runs.items():
            rows[name] = evaluate(name, path, args, pathlib.Path(tmp))
            write_atomic(out / f"{args.name}.json", json.dumps({"meta": meta, "rows": rows}, indent=1))
            write_atomic(out / f"{args.name}.md", markdown(meta, rows))
    print((out / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
