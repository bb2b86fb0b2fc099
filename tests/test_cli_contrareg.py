"""`jaxreg register|evaluate --method contrareg|deepsim` and the lambda sweep of `jaxreg evaluate --lambdas`,
with tiny 3D runs trained 2 steps (enough to exercise loading, lambda conditioning and the outputs)."""
import json

import numpy as np
import pytest

from jaxreg.cli import main

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

NET = dict(ndim=3, enc_features=(4, 4, 4, 4), dec_features=(4, 4, 4, 4), final_features=(4,), out_level=1)


class _Source:
    """Random 16^3 pairs in the batch layout of the training stack."""

    def __len__(self):
        return 10 ** 6

    def __getitem__(self, i):
        r = np.random.default_rng(i)
        x = r.uniform(size=(16, 16, 16, 1)).astype(np.float32)
        return {"fixed": x, "moving": np.roll(x, 1, axis=0), "fixed_contrast": np.int32(0),
                "moving_contrast": np.int32(1)}


def _train(method, model, workdir, monkeypatch):
    import ml_collections

    import train.train as T

    monkeypatch.setattr(T, "build_data", lambda config, wd: (_Source(), [], None))
    c = ml_collections.ConfigDict(dict(method=method, seed=0, num_train_steps=2, batch_size=1, num_devices=1,
                                       learning_rate=1e-3, log_every=1, checkpoint_every=2, eval_every=0, quiet=True,
                                       model=model, data=dict(kind="test", resolution=8.0)))
    T.train_and_evaluate(c, workdir)
    return workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    base = tmp_path_factory.mktemp("cr_runs")
    try:
        cr = _train("contrareg", dict(NET, contrasts=("t1", "t2"), num_samples=16), base / "cr", mp)
        ds = _train("deepsim", dict(NET, feature_widths=(2, 2, 2)), base / "ds", mp)
    finally:
        mp.undo()
    return {"contrareg": cr, "deepsim": ds}


def _ixi(data_dir, k):
    ids = sorted(p.name[: -len("_t1.nii.gz")] for p in (data_dir / "ixi").glob("*_t1.nii.gz"))
    return data_dir / "ixi" / f"{ids[k]}_t1.nii.gz", data_dir / "ixi" / f"{ids[k]}_labels.nii.gz"


@pytest.mark.parametrize("method", ["contrareg", "deepsim"])
def test_register_learned_similarity_networks(runs, method, data_dir, tmp_path, capsys):
    (f, fl), (m, ml) = _ixi(data_dir, 1), _ixi(data_dir, 0)
    out = tmp_path / "out"
    args = ["register", "--fixed", str(f), "--moving", str(m), "--out", str(out), "--method", method,
            "--checkpoint", str(runs[method]), "--fixed-labels", str(fl), "--moving-labels", str(ml), "--quiet"]
    assert main(args + ["--lambda", "0.3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and 0.0 <= metrics["dice_mean"] <= 1.0
    assert (out / "warp.nii.gz").is_file() and (out / "warped.nii.gz").is_file()
    out2 = tmp_path / "out2"
    assert main([*args[:6], str(out2), *args[7:]]) != 0  # no --lambda for a lambda-conditioned network
    assert "pass --lambda" in capsys.readouterr().err and not out2.exists()
    other = "deepsim" if method == "contrareg" else "contrareg"
    assert main([*args[:6], str(out2), "--method", method, "--checkpoint", str(runs[other]), "--lambda", "0.3",
                 "--quiet"]) != 0
    assert "network, not" in capsys.readouterr().err and not out2.exists()


def test_evaluate_lambda_sweep_tables_plots_and_selects(runs, data_dir, tmp_path, capsys):
    (f, fl), (m, ml) = _ixi(data_dir, 1), _ixi(data_dir, 0)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"fixed,moving,fixed_labels,moving_labels\n{f},{m},{fl},{ml}\n")
    out = tmp_path / "sweep"
    assert main(["evaluate", "--pairs", str(pairs), "--method", "contrareg", "--checkpoint", str(runs["contrareg"]),
                 "--lambdas", "0,0.5,1", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert [r["lambda"] for r in summary["sweep"]] == [0.0, 0.5, 1.0]
    ok = [r for r in summary["sweep"] if r["folding_percent"] < 0.5]
    assert summary["selected"] == max(ok, key=lambda r: r["dice_mean"])
    assert (out / "sweep.png").stat().st_size > 1000 and "Selected" in (out / "summary.md").read_text()
    assert (out / "per_pair.csv").read_text().splitlines()[0].startswith("lambda,name")
    for bad, msg in ((["--lambdas", "0,2"], "comma-separated numbers in [0, 1]"),
                     (["--lambdas", "sweep", "--lambda", "0.1"], "not both")):
        o = tmp_path / "bad"
        assert main(["evaluate", "--pairs", str(pairs), "--method", "contrareg", "--checkpoint",
                     str(runs["contrareg"]), "--out", str(o), "--quiet", *bad]) != 0
        assert msg in capsys.readouterr().err and not o.exists()


def test_register_io_deepsim_with_an_extractor_run(runs, data_dir, tmp_path, capsys):
    (f, fl), (m, ml) = _ixi(data_dir, 1), _ixi(data_dir, 0)
    out = tmp_path / "out"
    args = ["register", "--fixed", str(f), "--moving", str(m), "--out", str(out), "--fixed-labels", str(fl),
            "--moving-labels", str(ml), "--method", "io-deepsim"]
    # a deepsim run holds its frozen extractor; io-deepsim registers on the grid it was trained on (8 mm here)
    assert main(args + ["--checkpoint", str(runs["deepsim"])]) == 0
    err = capsys.readouterr().err
    assert "registering at 8 mm" in err and "descriptors: 6 channels" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "io-deepsim" and metrics["similarity"].startswith("deepsim loss")
    assert metrics["similarity_after"] < metrics["similarity_before"] and 0.0 <= metrics["dice_mean"] <= 1.0
    bad = tmp_path / "bad"
    for extra, msg in (([], "needs --checkpoint"), (["--checkpoint", str(runs["contrareg"])], "DeepSim extractor"),
                       (["--checkpoint", str(tmp_path / "none")], "--checkpoint")):
        assert main([*args[:6], str(bad), *args[7:], *extra, "--quiet"]) != 0
        assert msg in capsys.readouterr().err and not bad.exists()
    assert main([*args[:6], str(bad), "--method", "io-mind", "--checkpoint", str(runs["deepsim"]), "--quiet"]) != 0
    assert "only used with" in capsys.readouterr().err and not bad.exists()
