"""benchmarks/dns_ablation.py: what it reads from a training run and how it tables it (no registration)."""
import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("dns_ablation", ROOT / "benchmarks" / "dns_ablation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path, name, dilations, invert, vals):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"num_train_steps": 500,
                                               "model": {"dilations": dilations, "invert_prob": invert}}))
    lines = [{"step": 10, "loss": 3.0}]
    lines += [{"step": s, "val_infonce": i, "val_top1": t} for s, i, t in vals]
    lines += [{"step": 510, "loss": 1.0}]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    return d


def test_reads_the_last_validation_and_the_run_settings(ablation, tmp_path):
    d = _run(tmp_path, "single", [1], 0.5, [(250, 3.1, 0.29), (500, 2.9, 0.32)])
    assert ablation.validation_metrics(d) == {"step": 500, "val_infonce": 2.9, "val_top1": 0.32}
    assert ablation.run_settings(d) == {"dilations": [1], "invert_prob": 0.5, "steps": 500}
    assert ablation.validation_metrics(_run(tmp_path, "none", [1, 2], 0.0, [])) == {}
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        ablation.validation_metrics(tmp_path / "missing")


def test_table_has_one_row_per_variant_with_its_numbers(ablation):
    meta = {"started": "2026-12-03 17:00", "commit": "abc", "machine": "m", "command": "c",
            "earlier_runs": [{"command": "c0", "started": "s0", "commit": "k0"}]}
    rows = {"dual": {"dilations": [1, 2], "invert_prob": 0.5, "steps": 500, "weights_step": 500,
                     "validation": {"val_infonce": 2.92, "val_top1": 0.3226}, "epe_a_before_mm": 2.28,
                     "epe_a_mm": 1.40, "folding_a": 0.0, "dice_mono": 0.577, "dice_cross": 0.575, "folding_mono": 0.01},
            "single": {"dilations": [1], "invert_prob": 0.5, "steps": 500, "weights_step": 400, "validation": {}}}
    md = ablation.markdown(meta, rows)
    dual = next(line for line in md.splitlines() if line.startswith("| dual"))
    assert "(1, 2)" in dual and "2.92 / 0.323" in dual and "2.28 -> **1.40**" in dual and "0.577 / 0.575" in dual
    assert dual.rstrip().endswith("| 0.010 |")  # the largest folding over the parts
    single = next(line for line in md.splitlines() if line.startswith("| single"))
    assert "400 / 500" in single and "– / –" in single
    assert "`c0`" in md
