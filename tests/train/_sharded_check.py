"""Run by test_train.py in a subprocess with 4 simulated CPU devices; prints a JSON report."""
import json
import os
import pathlib
import sys
import tempfile

assert "xla_force_host_platform_device_count=4" in os.environ.get("XLA_FLAGS", "")
ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(ROOT / "tests" / "train"))
from conftest import tiny_config  # noqa: E402
from train import parallel  # noqa: E402
from train import train as T  # noqa: E402


def one_step(config, n_dev, batch):
    mesh = parallel.make_mesh(n_dev)
    graphdef, state, tx, mod = T.create_state(config, mesh)
    step = T.make_train_step(graphdef, tx, mod, mesh)
    state, metrics = step(state, parallel.shard_batch(batch, mesh))
    return jax.device_get(state["params"]), float(metrics["loss"])


def main():
    data = pathlib.Path(sys.argv[1])
    report = {"devices": jax.device_count()}
    with tempfile.TemporaryDirectory() as tmp:
        config = tiny_config(data)
        source, _, _ = T.build_data(config, pathlib.Path(tmp))
        batch = next(iter(T.make_dataset(source, batch_size=4)))
        batch = {k: batch[k] for k in ("fixed", "moving")}
        p1, l1 = one_step(config, 1, batch)
        p4, l4 = one_step(config, 4, batch)
        diffs = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4))]
        report.update(step_loss_1=l1, step_loss_4=l4, step_param_max_abs_diff=max(diffs))
        runs = {}
        for n in (1, 4):
            res = T.train_and_evaluate(tiny_config(data, num_devices=n, num_train_steps=5), pathlib.Path(tmp) / f"run{n}")
            lines = [json.loads(x) for x in (pathlib.Path(tmp) / f"run{n}" / "metrics.jsonl").read_text().splitlines()]
            runs[n] = [r["loss"] for r in lines if "loss" in r]
            report[f"traces_{n}"] = res["train_step_traces"]
        report["run_losses_1"], report["run_losses_4"] = runs[1], runs[4]
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
