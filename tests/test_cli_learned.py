"""`jaxreg register --method vxm --checkpoint` and `jaxreg evaluate` on real IXI scans with a tiny trained model."""
import json

import numpy as np
import pytest

from jaxreg.cli import main

pytestmark = [pytest.mark.realdata]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    """A 3D VoxelMorph trained 2 steps on IXI at 8 mm (16^3 grid): enough to exercise loading and inference."""
    from configs import vxm_ixi
    from train.train import train_and_evaluate

    c = vxm_ixi.get_config()
    c.num_train_steps, c.batch_size, c.log_every, c.checkpoint_every, c.eval_every = 2, 1, 1, 2, 0
    c.quiet, c.num_devices, c.schedule = True, 1, "constant"
    c.model.enc_features, c.model.dec_features, c.model.final_features = (4, 4, 4, 4), (4, 4, 4, 4), (4,)
    c.data.root, c.data.resolution, c.data.prealign = str(data_dir), 8.0, False
    workdir = tmp_path_factory.mktemp("vxm_run")
    train_and_evaluate(c, workdir)
    return workdir


def _ixi(data_dir, k):
    ids = sorted(p.name[: -len("_t1.nii.gz")] for p in (data_dir / "ixi").glob("*_t1.nii.gz"))
    return data_dir / "ixi" / f"{ids[k]}_t1.nii.gz", data_dir / "ixi" / f"{ids[k]}_labels.nii.gz"


def test_register_vxm_writes_all_outputs(tiny_run, data_dir, tmp_path):
    (f, fl), (m, ml) = _ixi(data_dir, 1), _ixi(data_dir, 0)
    out = tmp_path / "out"
    rc = main(["register", "--fixed", str(f), "--moving", str(m), "--out", str(out), "--method", "vxm",
               "--checkpoint", str(tiny_run), "--fixed-labels", str(fl), "--moving-labels", str(ml), "--quiet", "--qc"])
    assert rc == 0
    for name in ("warped.nii.gz", "warp.nii.gz", "inverse_warp.nii.gz", "warped_labels.nii.gz", "metrics.json",
                 "qc.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "vxm" and 0.0 <= metrics["dice_mean"] <= 1.0
    assert metrics["folding_percent"] < 1.0


def test_register_vxm_errors_leave_nothing(tiny_run, data_dir, tmp_path, capsys):
    (f, _), (m, _) = _ixi(data_dir, 1), _ixi(data_dir, 0)
    cases = [(["--method", "vxm"], "needs --checkpoint"),
             (["--method", "vxm", "--checkpoint", str(tiny_run), "--lambda", "0.5"], "not lambda-conditioned"),
             (["--method", "vxm", "--checkpoint", str(tmp_path)], "not a training run"),
             (["--method", "io-mind", "--checkpoint", str(tiny_run)], "only used with --method vxm")]
    for k, (extra, msg) in enumerate(cases):
        out = tmp_path / f"out{k}"
        rc = main(["register", "--fixed", str(f), "--moving", str(m), "--out", str(out), "--quiet", *extra])
        assert rc != 0
        assert msg in capsys.readouterr().err
        assert not out.exists() or not any(out.iterdir())


def test_evaluate_writes_per_pair_and_summary(tiny_run, data_dir, tmp_path):
    rows = ["fixed,moving,fixed_labels,moving_labels"]
    for a, b in ((1, 0), (2, 1)):
        (f, fl), (m, ml) = _ixi(data_dir, a), _ixi(data_dir, b)
        rows.append(f"{f},{m},{fl},{ml}")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("\n".join(rows) + "\n")
    out = tmp_path / "eval"
    assert main(["evaluate", "--pairs", str(pairs), "--method", "vxm", "--checkpoint", str(tiny_run),
                 "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["summary"]["pairs"] == 2 and len(summary["pairs"]) == 2
    per = [r["dice_mean"] for r in summary["pairs"]]
    np.testing.assert_allclose(summary["summary"]["dice_mean_mean"], np.mean(per), rtol=1e-6)
    assert (out / "per_pair.csv").read_text().count("\n") == 3 and "| **mean** |" in (out / "summary.md").read_text()
    # Refuses to overwrite; a bad pairs file is rejected before any work.
    assert main(["evaluate", "--pairs", str(pairs), "--method", "vxm", "--checkpoint", str(tiny_run),
                 "--out", str(out), "--quiet"]) != 0
    bad = tmp_path / "bad.csv"
    bad.write_text("fixed,moving\nnope.nii.gz,nope2.nii.gz\n")
    assert main(["evaluate", "--pairs", str(bad), "--out", str(tmp_path / "e2"), "--quiet"]) != 0
    assert not (tmp_path / "e2").exists()
