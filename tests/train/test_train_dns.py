"""configs/dns_brain.py through the training stack at a tiny size: views data, DNS loss, validation, export."""
import json
import pathlib

import numpy as np
import pytest

pytestmark = pytest.mark.realdata


def _tiny(data_dir):
    from configs import dns_brain

    c = dns_brain.get_config()
    c.num_train_steps = 4
    c.log_every = 1
    c.checkpoint_every = 4
    c.eval_every = 4
    c.quiet = True
    c.num_devices = 1
    c.model.enc_features = (4, 4, 8, 8)
    c.model.dec_features = (8, 4, 4)
    c.model.num_samples = 512
    c.data.root = str(data_dir)
    c.data.resolution = 8.0
    c.data.crop = (16, 16, 16)
    c.data.train_cases = ("ixi_t2/IXI002", "mni152")
    c.data.val_cases = ("ixi/IXI012-HH-1211",)
    return c


def test_dns_trains_validates_and_exports(data_dir, tmp_path):
    from jaxreg.methods import dns as D
    from jaxreg.weights import export_run, load_model
    from train import train as T

    out = T.train_and_evaluate(_tiny(data_dir), tmp_path / "run")
    assert out["step"] == 4 and out["train_step_traces"] == 1
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and 0 <= r["top1"] <= 1 for r in train_rows)
    val = [r for r in rows if "val_infonce" in r]
    assert len(val) == 1 and 0 < val[0]["val_infonce"] < np.log(4096) + 1 and 0 <= val[0]["val_top1"] <= 1
    st, js = export_run(tmp_path / "run", tmp_path / "w" / "tiny")
    meta = json.loads(pathlib.Path(js).read_text())
    assert meta["method"] == "dns" and meta["training"]["step"] == 4
    module, model, _ = load_model(str(st), method="dns")
    assert module is D and model.config.num_samples == 512
