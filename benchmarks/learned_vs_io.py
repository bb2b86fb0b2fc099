#!/usr/bin/env python
"""A trained network vs io-mind on the same validation pairs of its training run.

Loads ``WORKDIR`` (``python -m train.main --workdir``), rebuilds its
validation pairs exactly as training did (``train.train.build_data``: common
grid, affine pre-alignment to the first subject, mono-contrast and
sin-remapped fixed images), and registers every pair with (a) the network
(one forward pass) and (b) jaxreg's default instance optimisation (io-mind,
``InstanceConfig()``) on the same arrays. Dice = mean over labels present in
either map; "before" = after the affine pre-alignment only. Reports each
method's Dice gain over affine-only alignment and the network's gain as a
fraction of io-mind's, % folding, and time per pair.

Usage::

    .venv/bin/python benchmarks/learned_vs_io.py --workdir runs/vxm_ixi --out benchmarks/results
"""
import argparse
import json
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=pathlib.Path, required=True)
    p.add_argument("--out", type=pathlib.Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--name", default="learned_vs_io")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import ml_collections

    from jaxreg import metrics as M
    from jaxreg.io.checkpoint import load_trained
    from jaxreg.methods import restore_model
    from jaxreg.optimize import InstanceConfig, register_instance
    from jaxreg.spatial import warp_labels
    from train.train import build_data

    run_cfg, params, step = load_trained(args.workdir)
    module, model = restore_model(run_cfg, params)
    config = ml_collections.ConfigDict(run_cfg)
    _, val, (shape, _) = build_data(config, args.workdir)
    lam = run_cfg.get("eval_lambda") if model.config.hyper else None

    def dice(pred, target):
        return float(np.nanmean(M.dice(np.asarray(pred), np.asarray(target))))

    rows = []
    for ex in val:
        f, m = jnp.asarray(ex["fixed"]), jnp.asarray(ex["moving"])
        before = dice(ex["moving_labels"], ex["fixed_labels"])
        module.register(model, f, m, lam=lam)  # compile outside the timing
        t0 = time.perf_counter()
        out = module.register(model, f, m, lam=lam)
        jax.block_until_ready(out.disp)
        t_net = time.perf_counter() - t0
        d_net = out.disp
        t0 = time.perf_counter()
        res = register_instance(f, m, config=InstanceConfig())
        jax.block_until_ready(res.total_disp)
        t_io = time.perf_counter() - t0
        row = {"pair": ex["name"], "dice_affine": before,
               "dice_net": dice(warp_labels(jnp.asarray(ex["moving_labels"]), d_net), ex["fixed_labels"]),
               "dice_io": dice(warp_labels(jnp.asarray(ex["moving_labels"]), res.total_disp), ex["fixed_labels"]),
               "folding_net": float(M.folding_percent(d_net)), "folding_io": float(M.folding_percent(res.total_disp)),
               "time_net_s": t_net, "time_io_s": t_io}
        row["gain_fraction"] = (row["dice_net"] - before) / max(row["dice_io"] - before, 1e-9)
        rows.append(row)
        print(json.dumps(row), flush=True)
    groups = {}
    for r in rows:
        groups.setdefault("cross" if "(sin)" in r["pair"] else "mono", []).append(r)
    summary = {}
    for g, rs in groups.items():
        mean = {k: float(np.mean([r[k] for r in rs])) for k in rs[0] if k != "pair"}
        mean["gain_fraction_of_means"] = ((mean["dice_net"] - mean["dice_affine"])
                                          / max(mean["dice_io"] - mean["dice_affine"], 1e-9))
        summary[g] = mean
    meta = {"workdir": str(args.workdir), "step": step, "grid": list(shape), "method": run_cfg.get("method"),
            "model": run_cfg.get("model"), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "jax": jax.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    md = [f"# {run_cfg.get('method')} (step {step}) vs io-mind on the run's validation pairs "
          f"(`benchmarks/learned_vs_io.py`)", "", f"- grid {shape}; {meta['date']}; workdir `{args.workdir}`", "",
          "| set | pairs | Dice affine only | Dice network | Dice io-mind | network gain / io-mind gain | "
          "% folding net / io | time net / io (s) |", "|---|---|---|---|---|---|---|---|"]
    for g, s in summary.items():
        md.append(f"| {g} | {len(groups[g])} | {s['dice_affine']:.3f} | {s['dice_net']:.3f} | {s['dice_io']:.3f} | "
                  f"{100 * s['gain_fraction_of_means']:.0f} % | {s['folding_net']:.3f} / {s['folding_io']:.3f} | "
                  f"{s['time_net_s']:.2f} / {s['time_io_s']:.1f} |")
    (args.out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
