"""ContraReg-style Table 1 on held-out 2D cross-contrast pairs: every lambda-conditioned row over 17 lambdas (issue 14).

Usage (from the repository root, after the runs named in configs/contrareg_brain2d.py)::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python benchmarks/crossreg_table.py \\
        --config configs/contrareg_brain2d.py --run mCR=runs/mcr_brain2d --run CR=runs/cr_brain2d \\
        --run DeepSim-AE=runs/deepsim_ae_2d --run VXM-MI=runs/vxm_mi_2d --run VXM-LocalMI=runs/vxm_lmi_2d \\
        --run VXM-MIND=runs/vxm_mind_2d --run VXM-NGF=runs/vxm_ngf_2d --io-mind \\
        --out benchmarks/results/crossreg_table

Pairs: the config's validation examples (``train.train.build_crossreg_data``):
held-out subjects, fixed = the T1 slice, moving = the T2 / FLAIR / T1c slice
warped by a known random smooth deformation (the same for every contrast of a
slice). Scores per pair (``benchmarks/car_contrasts.score``): endpoint error
(mm, fixed foreground), tumour Dice (labels present; slices without tumour
are left out), % folding (det J <= 0), SDlogJ. Each network is evaluated at
the 17 lambdas of :data:`jaxreg.sweep.LAMBDA_SWEEP`; the table row is the
lambda with the lowest mean endpoint error among those with mean folding
< 0.5 % (ContraReg Table 1 selects by Dice; here the known field is the
sharper criterion, and the Dice-selected lambda is listed too). Dice30: the
mean of the lowest 30 % of the per-pair Dice scores (ContraReg Sec. 4).
io-mind (``InstanceConfig(affine=False)``) is the non-learned reference;
``--io-deepsim NAME=RUN`` adds instance optimisation with the DeepSim features
of an extractor run under the same optimiser settings (DeepSim eq. 5 as the
similarity, :func:`jaxreg.methods.deepsim.descriptors`).
Writes OUT.json, OUT.md and OUT.png (EPE, Dice, folding, SDlogJ against lambda).
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from car_contrasts import _load_config, run_io, score  # noqa: E402


def summarise(rows: list[dict]) -> dict:
    """Means over pairs (Dice over the pairs that have it), Dice30, and per moving contrast EPE."""
    out = {"pairs": len(rows)}
    for k in ("epe_mm", "epe_before_mm", "dice", "dice_before", "folding_percent", "sdlogj"):
        vals = [r[k] for r in rows if k in r and np.isfinite(r[k])]
        out[k] = float(np.mean(vals)) if vals else None
    dice = sorted(r["dice"] for r in rows if "dice" in r and np.isfinite(r["dice"]))
    out["dice30"] = float(np.mean(dice[:max(1, int(round(0.3 * len(dice))))])) if dice else None
    for c in sorted({r["contrast"] for r in rows}):
        for k in ("epe_mm", "dice"):
            vals = [r[k] for r in rows if r["contrast"] == c and k in r and np.isfinite(r[k])]
            if vals:
                out[f"{k}_{c.replace('->', '_')}"] = float(np.mean(vals))
    return out


def sweep_network(run_dir: str, examples: list[dict], lambdas, spacing: float, batch: int = 16):
    """``(per-lambda summaries, per-lambda rows, step, seconds per full pass)`` of one run."""
    from jaxreg.io.checkpoint import load_trained
    from jaxreg.methods import restore_model

    cfg, params, step = load_trained(run_dir)
    module, model = restore_model(cfg, params)
    hyper = bool(model.config.hyper)
    summaries, rows_by_lam, secs = [], {}, []
    for lam in (lambdas if hyper else [None]):
        disps, t0 = [], time.perf_counter()
        for i in range(0, len(examples), batch):
            chunk = examples[i:i + batch]
            f = jnp.stack([jnp.asarray(e["fixed"]) for e in chunk])
            m = jnp.stack([jnp.asarray(e["moving"]) for e in chunk])
            disps.extend(np.asarray(module.register(model, f, m, lam=lam).disp))
        secs.append(time.perf_counter() - t0)
        rows = [score(e, d, spacing) for e, d in zip(examples, disps)]
        rows_by_lam[lam] = rows
        summaries.append({"lambda": lam, **summarise(rows)})
    return summaries, rows_by_lam, step, float(np.median(secs))


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("epe_mm", "dice", "folding_percent", "sdlogj")
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    for name, res in results.items():
        sw = res["sweep"]
        if sw[0]["lambda"] is None:
            for ax, k in zip(axes, keys):
                if sw[0].get(k) is not None:
                    ax.axhline(sw[0][k], ls="--", lw=1, color="k", label=name)
            continue
        lams = [s["lambda"] for s in sw]
        for ax, k in zip(axes, keys):
            ax.plot(lams, [s[k] if s.get(k) is not None else np.nan for s in sw], "o-", ms=2.5, label=name)
    for ax, k in zip(axes, keys):
        ax.set_title(k)
        ax.set_xlabel("lambda")
        ax.grid(alpha=0.3)
    axes[2].axhline(0.5, color="grey", lw=0.8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(results: dict, meta: dict) -> str:
    fmt = lambda v, p=3: "–" if v is None else f"{v:.{p}f}"  # noqa: E731
    if meta["criterion"] == "dice":
        return markdown_dice(results, meta)
    meta = dict(meta, epe_before=meta["before"]["epe_mm"])
    b = meta["before"]
    labels = ("none of these has labels: EPE is the accuracy measure" if b.get("dice") is None else
              f"Dice before registration {fmt(b['dice'])}, Dice30 {fmt(b['dice30'])}; "
              "slices without labels are left out")
    which = (f"3D pairs ({meta['cases']}; whole volumes at {meta['resolution']:g} mm, "
             if meta.get("ndim") == 3 else f"2D pairs ({meta['cases']}; {meta['num_slices']} slices per case, ")
    lines = [f"# Cross-contrast comparison at the lambda with < 0.5 % folding ({meta['config']})", "",
             f"Generated by `benchmarks/crossreg_table.py` on {meta['date']}: {meta['pairs']} held-out {which}"
             "fixed = T1, moving = T2 / FLAIR / T1c warped by a known deformation; EPE before registration "
             f"{fmt(meta['epe_before'], 2)} mm). "
             "Each network is evaluated at 17 lambdas; the row is the lambda with the lowest mean EPE among those "
             "with mean folding < 0.5 %. Dice / Dice30 (mean of the lowest 30 %) over tumour / lesion labels where "
             f"a held-out case has them ({labels}).", "",
             "| method | step | opt. lambda | EPE (mm) | EPE T2 / FLAIR / T1c | Dice | Dice30 | % folds | SDlogJ "
             "| lambda by Dice |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        s = res["selected"]
        if s is None:
            lines.append(f"| {name} | {res.get('step', '')} | none < 0.5 % | | | | | | | |")
            continue
        lam = "–" if s["lambda"] is None else f"{s['lambda']:g}"
        by_dice = res.get("selected_by_dice")
        lines.append(
            f"| {name} | {res.get('step', '–')} | {lam} | {fmt(s['epe_mm'], 2)} | {fmt(s.get('epe_mm_t2'), 2)} / "
            f"{fmt(s.get('epe_mm_flair'), 2)} / {fmt(s.get('epe_mm_t1c'), 2)} | {fmt(s['dice'])} | {fmt(s['dice30'])} "
            f"| {fmt(s['folding_percent'])} | {fmt(s['sdlogj'])} | "
            + ("–" if not by_dice or by_dice["lambda"] is None else f"{by_dice['lambda']:g} (Dice {fmt(by_dice['dice'])})")
            + " |")
    lines += ["", "Best EPE at any lambda (ignoring folding): "
              + "; ".join(f"{n} {min(s['epe_mm'] for s in r['sweep']):.2f} mm" for n, r in results.items()), "",
              "Time per pass over all pairs: "
              + "; ".join(f"{n} {r['seconds']:.2f} s" for n, r in results.items()),
              "", f"Plot: `{meta['plot']}`."]
    return "\n".join(lines) + "\n"


def markdown_dice(results: dict, meta: dict) -> str:
    """The table of label pairs without a known field (IXI): rows at the best Dice with folding < 0.5 %."""
    fmt = lambda v, p=3: "–" if v is None else f"{v:.{p}f}"  # noqa: E731
    b = meta["before"]
    lines = [f"# Comparison at the lambda with < 0.5 % folding and the best Dice ({meta['config']})", "",
             f"Generated by `benchmarks/crossreg_table.py` on {meta['date']}: {meta['pairs']} held-out "
             + (f"3D pairs ({meta['cases']}; whole volumes at {meta['resolution']:g} mm, both orders, "
                "mono-contrast T1 -> T1 and with the fixed volume `sin`-remapped"
                if meta.get("ndim") == 3 else
                f"2D pairs ({meta['cases']}; {meta['num_slices']} slices per ordered pair, mono-contrast T1 -> T1 "
                "and with the fixed slice `sin`-remapped")
             + f"; Dice over the labels present). Before registration: Dice "
             f"{fmt(b.get('dice_t1_t1'))} (mono). 17 lambdas per network.", "",
             "| method | step | opt. lambda | Dice (mono) | Dice (sin) | Dice30 (all) | % folds | SDlogJ |",
             "|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        s = res["selected"]
        if s is None:
            lines.append(f"| {name} | {res.get('step', '')} | none < 0.5 % | | | | | |")
            continue
        lam = "–" if s["lambda"] is None else f"{s['lambda']:g}"
        lines.append(f"| {name} | {res.get('step', '–')} | {lam} | {fmt(s.get('dice_t1_t1'))} | "
                     f"{fmt(s.get('dice_t1_sin'))} | {fmt(s['dice30'])} | {fmt(s['folding_percent'])} | "
                     f"{fmt(s['sdlogj'])} |")
    lines += ["", "The lambda is chosen on the mean Dice of both kinds of pair.", "",
              "Time per pass over all pairs: " + "; ".join(f"{n} {r['seconds']:.2f} s" for n, r in results.items()),
              "", f"Plot: `{meta['plot']}`."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from jaxreg.sweep import LAMBDA_SWEEP, select_lambda

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/contrareg_brain2d.py")
    p.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR (repeatable)")
    p.add_argument("--io-mind", action="store_true")
    p.add_argument("--io-deepsim", action="append", default=[],
                   help="NAME=RUN_DIR: io-deepsim with the DeepSim extractor of that run (repeatable)")
    p.add_argument("--num-slices", type=int, default=8)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import tempfile

    from train.train import build_data

    config = _load_config(args.config)
    config.data.num_val = args.num_slices
    with tempfile.TemporaryDirectory() as tmp:
        _, examples, _ = build_data(config, pathlib.Path(tmp))
    has_epe = all("disp_true" in e for e in examples)
    crit = ("epe_mm", False) if has_epe else ("dice", True)
    spacing = float(config.data.resolution)
    results = {}
    for spec in args.run:
        name, run_dir = spec.split("=", 1)
        sweep, _, step, secs = sweep_network(run_dir, examples, LAMBDA_SWEEP, spacing)
        results[name] = {"run": run_dir, "step": step, "seconds": secs, "sweep": sweep,
                         "selected": select_lambda(sweep, score=crit[0], higher_is_better=crit[1]),
                         "selected_by_dice": select_lambda(sweep, score="dice")}
        print(name, json.dumps(results[name]["selected"]), flush=True)
    io_rows = [("io-mind", None)] if args.io_mind else []
    io_rows += [tuple(spec.split("=", 1)) for spec in args.io_deepsim]
    for name, run_dir in io_rows:  # instance optimisation: one row, no lambda
        feature_fn = None
        if run_dir is not None:
            from jaxreg.methods import deepsim

            feature_fn = deepsim.feature_fn(deepsim.load_extractor(run_dir)[0])
        disps, secs = run_io(examples, feature_fn=feature_fn)
        s = {"lambda": None, **summarise([score(e, d, spacing) for e, d in zip(examples, disps)])}
        results[name] = {**({"run": run_dir} if run_dir else {}), "seconds": secs, "sweep": [s], "selected": s,
                         "selected_by_dice": s}
        print(name, json.dumps(s), flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    zero = [score(e, np.zeros(e["fixed"].shape[:-1] + (e["fixed"].ndim - 1,), np.float32), spacing) for e in examples]
    before = summarise(zero)
    cases = config.data.get("val_cases") or tuple(config.data.get("test_cases", ())) + tuple(config.data.label_cases)
    meta = {"config": args.config, "date": time.strftime("%Y-%m-%d"), "pairs": len(examples), "criterion": crit[0],
            "num_slices": args.num_slices, "cases": ", ".join(cases), "before": before,
            "ndim": int(examples[0]["fixed"].ndim - 1), "resolution": spacing,
            "plot": str(out.with_suffix(".png")), "device": str(jax.devices()[0])}
    plot(results, out.with_suffix(".png"))
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    out.with_suffix(".md").write_text(markdown(results, meta))
    print(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
