"""CAR on contrasts it never saw: trained networks and io-mind on the same held-out pairs (issue 15).

Usage (from the repository root, after training the runs of configs/car_brain2d.py)::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python benchmarks/car_contrasts.py \\
        --config configs/car_brain2d.py --run CAR=runs/car2d --run "w/o CLR=runs/car2d_noclr" \\
        --run RC-3=runs/car2d_rc3 --run "VXM-LNCC (T1 only)=runs/car2d_vxm" --io-mind \\
        --num-slices 8 --out benchmarks/results/car_contrasts

Pairs (:func:`train.train.car_examples`, the config's held-out cases):
known deformations (fixed = the T1 slice, moving = each contrast of the same
subject warped by one random smooth deformation per slice, identical for
every contrast), scored by the endpoint error (mm, fixed foreground), and
IXI inter-subject T1 pairs (148 labels), mono-contrast and with the fixed
image ``sin`` remapped, scored by Dice. Every method: % folding (det J <= 0)
and SDlogJ. io-mind: ``InstanceConfig(affine=False)`` (the pairs are already
affinely aligned), the non-learned reference. Writes ``OUT.json`` (per pair)
and ``OUT.md`` (per method and moving contrast).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxreg import metrics as M  # noqa: E402
from jaxreg.spatial import warp_labels  # noqa: E402


def _load_config(path: str):
    from jaxreg.compare import load_config

    return load_config(path)


def score(ex: dict, disp: np.ndarray, spacing: float) -> dict:
    """Endpoint error (known deformations) or Dice (label pairs), % folding and SDlogJ of one result."""
    disp = np.asarray(disp, np.float32)
    row = {"name": ex["name"], "case": ex["case"], "contrast": ex["contrast"],
           "folding_percent": float(M.folding_percent(jnp.asarray(disp))), "sdlogj": float(M.sdlogj(jnp.asarray(disp)))}
    if "disp_true" in ex:
        fg = np.asarray(ex["fixed"])[..., 0] > 0.05
        sp = [spacing] * disp.shape[-1]
        row["epe_mm"] = M.endpoint_error_stats(disp, ex["disp_true"], spacing=sp, mask=fg)["mean"]
        row["epe_before_mm"] = M.endpoint_error_stats(np.zeros_like(disp), ex["disp_true"], spacing=sp, mask=fg)["mean"]
    if "fixed_labels" in ex:
        warped = np.asarray(warp_labels(jnp.asarray(ex["moving_labels"]), jnp.asarray(disp)))
        row["dice"] = float(np.nanmean(M.dice(warped, ex["fixed_labels"])))
        row["dice_before"] = float(np.nanmean(M.dice(ex["moving_labels"], ex["fixed_labels"])))
    return row


def run_network(run_dir: str, examples: list[dict], batch: int = 16) -> tuple[list[np.ndarray], float, int]:
    """Displacements of a trained run on every example (batched forward passes), seconds, step."""
    from jaxreg.io.checkpoint import load_trained
    from jaxreg.methods import restore_model

    cfg, params, step = load_trained(run_dir)
    module, model = restore_model(cfg, params)
    out, t0 = [], time.perf_counter()
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        f = jnp.stack([jnp.asarray(e["fixed"]) for e in chunk])
        m = jnp.stack([jnp.asarray(e["moving"]) for e in chunk])
        out.extend(np.asarray(module.register(model, f, m).disp))
    return out, time.perf_counter() - t0, step


def run_io(examples: list[dict], feature_fn=None) -> tuple[list[np.ndarray], float]:
    """Instance optimisation of every example (no affine stage): io-mind, or with ``feature_fn`` the
    learned-descriptor cosine (io-dns / io-deepsim) under the same optimiser settings."""
    from jaxreg.optimize import InstanceConfig, register_instance

    cfg = InstanceConfig(affine=False, similarity="mind" if feature_fn is None else "dns")
    out, t0 = [], time.perf_counter()
    for e in examples:
        out.append(np.asarray(register_instance(jnp.asarray(e["fixed"]), jnp.asarray(e["moving"]), config=cfg,
                                                feature_fn=feature_fn).disp))
    return out, time.perf_counter() - t0


def summarise(rows: list[dict]) -> dict:
    """Per moving contrast: mean EPE / Dice / folding / SDlogJ, and the number of pairs."""
    out = {}
    for c in sorted({r["contrast"] for r in rows}):
        rs = [r for r in rows if r["contrast"] == c]
        s = {"pairs": len(rs)}
        for k in ("epe_mm", "epe_before_mm", "dice", "dice_before", "folding_percent", "sdlogj"):
            vals = [r[k] for r in rs if k in r and np.isfinite(r[k])]
            if vals:
                s[k] = float(np.mean(vals))
        out[c] = s
    unseen = [r for r in rows if "epe_mm" in r and r["contrast"] != "t1"]
    if unseen:
        s = {"pairs": len(unseen)}
        for k in ("epe_mm", "epe_before_mm", "folding_percent", "sdlogj"):
            s[k] = float(np.mean([r[k] for r in unseen]))
        t1 = out.get("t1", {})
        if "epe_mm" in t1:  # the contrast-agnostic claim: unseen contrasts against T1 -> T1 on the same problems
            s["epe_ratio_to_t1"] = s["epe_mm"] / t1["epe_mm"]
            s["reduction_ratio_to_t1"] = (1 - s["epe_mm"] / s["epe_before_mm"]) / (1 - t1["epe_mm"] / t1["epe_before_mm"])
        out["unseen (t2, flair, t1c)"] = s
    return out


def markdown(results: dict, meta: dict) -> str:
    lines = [f"# CAR on unseen contrasts ({meta['config']})", "",
             f"Generated by `benchmarks/car_contrasts.py` on {meta['date']} ({meta['pairs']} pairs, "
             f"{meta['num_slices']} slices per case). Known deformations: fixed = T1, moving = the named contrast "
             "of the same held-out subject warped by the same random deformation; EPE in mm over the fixed "
             "foreground. IXI pairs: inter-subject T1 (148 labels), fixed mono or `sin`-remapped: Dice.", "",
             "| method | moving contrast | pairs | EPE before (mm) | EPE (mm) | Dice before | Dice | % folding | SDlogJ |",
             "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, p=3: "" if v is None else f"{v:.{p}f}"  # noqa: E731
    for name, res in results.items():
        for c, s in res["summary"].items():
            lines.append(f"| {name} | {c} | {s['pairs']} | {fmt(s.get('epe_before_mm'), 2)} | {fmt(s.get('epe_mm'), 2)} "
                         f"| {fmt(s.get('dice_before'))} | {fmt(s.get('dice'))} | {fmt(s.get('folding_percent'))} "
                         f"| {fmt(s.get('sdlogj'))} |")
    lines += ["", "Unseen contrasts against T1 -> T1 on the same slices and deformations (EPE ratio: unseen / T1, "
              "1 = contrast-agnostic; reduction ratio: the unseen contrasts' relative EPE reduction over T1's):", ""]
    for name, res in results.items():
        u = res["summary"].get("unseen (t2, flair, t1c)", {})
        if "epe_ratio_to_t1" in u:
            lines.append(f"- {name}: EPE ratio {u['epe_ratio_to_t1']:.3f}, reduction ratio {u['reduction_ratio_to_t1']:.3f}")
    lines += ["", "Per method: wall time of all forward passes (networks, batched) or registrations (io-mind), "
              "and the training step of the checkpoint.", ""]
    for name, res in results.items():
        lines.append(f"- {name}: {res['seconds']:.1f} s" + (f", step {res['step']} ({res['run']})" if res.get("run") else ""))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/car_brain2d.py")
    p.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR of a trained network (repeatable)")
    p.add_argument("--io-mind", action="store_true", help="also run io-mind on the same pairs")
    p.add_argument("--num-slices", type=int, default=8, help="slices per held-out case (2D configs)")
    p.add_argument("--out", required=True, help="output prefix (writes OUT.json and OUT.md)")
    args = p.parse_args(argv)

    from train.train import car_examples, load_car_subjects

    config = _load_config(args.config)
    _, evals, _ = load_car_subjects(config)
    examples = car_examples(evals, config.data, num_slices=args.num_slices, seed=1)
    spacing = float(config.data.resolution)
    results = {}
    for spec in args.run:
        name, run_dir = spec.split("=", 1)
        disps, secs, step = run_network(run_dir, examples)
        rows = [score(e, d, spacing) for e, d in zip(examples, disps)]
        results[name] = {"run": run_dir, "step": step, "seconds": secs, "rows": rows, "summary": summarise(rows)}
        print(name, json.dumps(results[name]["summary"]), flush=True)
    if args.io_mind:
        disps, secs = run_io(examples)
        rows = [score(e, d, spacing) for e, d in zip(examples, disps)]
        results["io-mind"] = {"seconds": secs, "rows": rows, "summary": summarise(rows)}
        print("io-mind", json.dumps(results["io-mind"]["summary"]), flush=True)
    meta = {"config": args.config, "date": time.strftime("%Y-%m-%d"), "pairs": len(examples),
            "num_slices": args.num_slices, "device": str(jax.devices()[0])}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    out.with_suffix(".md").write_text(markdown(results, meta))
    print(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
