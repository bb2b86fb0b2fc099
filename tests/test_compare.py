"""`jaxreg compare`: the scores against closed-form cases, config errors, and an end-to-end run on synthetic scans."""
import csv
import json
import pathlib

import nibabel as nib
import numpy as np
import pytest

from jaxreg import compare
from jaxreg.cli import main
from jaxreg.data.pairs import remap_intensity
from jaxreg.io import Volume

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _fixed(shape=(12, 10, 8), spacing=2.0):
    data = np.zeros(shape, np.float32)
    data[2:-2, 2:-2, 2:-2] = 1.0
    return Volume(data, np.diag([spacing, spacing, spacing, 1.0]))


def test_score_pair_closed_form_cases():
    fixed = _fixed()
    labels = np.zeros(fixed.data.shape, np.int32)
    labels[2:6, 2:8, 2:6], labels[6:10, 2:8, 2:6] = 1, 2
    zero = np.zeros((*fixed.data.shape, 3), np.float32)
    s = compare.score_pair(zero, fixed, labels, labels, disp_true=zero)
    assert s["dice"] == pytest.approx(1.0) and s["dice30"] == pytest.approx(1.0) and s["hd95_mm"] == 0.0
    assert s["epe_mm"] == 0.0 and s["folding_percent"] == 0.0 and s["sdlogj"] == pytest.approx(0.0, abs=1e-6)
    # a true map of one voxel along x, estimated as identity: 2 mm endpoint error everywhere
    truth = zero.copy()
    truth[..., 0] = 1.0
    assert compare.score_pair(zero, fixed, disp_true=truth)["epe_mm"] == pytest.approx(2.0)
    # labels 1 and 2 swapped: Dice 0 for both; only label 2 scored
    swapped = np.where(labels == 1, 2, np.where(labels == 2, 1, 0))
    assert compare.score_pair(zero, fixed, labels, swapped)["dice"] == pytest.approx(0.0)
    half = labels.copy()
    half[labels == 1] = 0
    s = compare.score_pair(zero, fixed, labels, half, labels=(2,))
    assert s["dice"] == pytest.approx(1.0) and s["epe_mm"] is None
    # a folding map is counted
    fold = zero.copy()
    fold[..., 0] = -1.5 * np.arange(fixed.data.shape[0])[:, None, None]
    assert compare.score_pair(fold, fixed)["folding_percent"] > 50


def test_summarize_means_scores_and_takes_the_median_time():
    rows = [{"set": "a", "method": "m", "dice": 0.5, "time_s": 1.0, "epe_mm": None},
            {"set": "a", "method": "m", "dice": 0.7, "time_s": 9.0, "epe_mm": None},
            {"set": "a", "method": "m", "dice": 0.9, "time_s": 2.0, "epe_mm": None}]
    s = compare.summarize(rows)["a"]["m"]
    assert s["dice"] == pytest.approx(0.7) and s["time_s"] == 2.0 and s["epe_mm"] is None and s["pairs"] == 3


def test_compare_brain_config_builds_full_and_quick():
    full = compare.load_config(str(ROOT / "configs" / "compare_brain.py"))
    quick = compare.load_config(str(ROOT / "configs" / "compare_brain.py") + ":quick")
    assert {s["name"] for s in full.pair_sets} == {"brats_known", "ms_known", "ixi_mono", "ixi_cross"}
    assert len(quick.methods) < len(full.methods)
    assert all(len(s.get("moving", "x")) == 1 or s.get("max_pairs") == 1 for s in quick.pair_sets)
    with pytest.raises(ValueError, match="unknown argument"):
        compare.load_config(str(ROOT / "configs" / "compare_brain.py") + ":nonsense")


def _save(path, data, spacing=1.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.diag([spacing, spacing, spacing, 1.0])), str(path))


def _blob(shape, centre, sigma):
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1)
    return np.exp(-np.sum((g - np.asarray(centre, np.float32)) ** 2, -1) / (2 * sigma**2)).astype(np.float32)


@pytest.fixture
def synthetic_data(tmp_path):
    """A two-contrast 'case' with a label map (1 mm, 48^3) and two labelled 'subjects' (2 mm, 24^3)."""
    root = tmp_path / "data"
    shape = (48, 48, 48)
    img = _blob(shape, (24, 24, 24), 10.0) + 0.6 * _blob(shape, (30, 18, 26), 5.0)
    _save(root / "case" / "t1.nii.gz", img)
    _save(root / "case" / "t2.nii.gz", remap_intensity(img))  # a second contrast with identical structures
    _save(root / "case" / "seg.nii.gz", ((img > 0.5).astype(np.int16) + (img > 0.9)).astype(np.int16))
    for name, shift in (("A", 0.0), ("B", 1.5)):
        s = _blob((24, 24, 24), (12 + shift, 12, 12 - shift), 5.0)
        _save(root / "subj" / f"{name}_t1.nii.gz", s, 2.0)
        _save(root / "subj" / f"{name}_labels.nii.gz", ((s > 0.3).astype(np.int16) + (s > 0.7)).astype(np.int16), 2.0)
    return root


CONFIG = '''
import ml_collections


def get_config(arg=""):
    c = ml_collections.ConfigDict()
    c.title = "synthetic"
    c.resolution, c.deform_mm, c.control_spacing, c.seed = 2.0, 3.0, 32, 0
    c.method_resolution = None
    c.pair_sets = (
        dict(name="known", kind="known_deformation", title="t2 -> t1", case="case", fixed="t1", moving=("t2",),
             labels="seg.nii.gz", label_values=(1, 2)),
        dict(name="inter", kind="inter_subject", title="A <-> B", subjects=("subj/A", "subj/B")),
    )
    c.methods = (
        dict(name="headers", method="identity"),
        dict(name="io-mind short", method="io-mind", affine=False, levels=1, iterations=(50,)),
        dict(name="CAR", method="car", checkpoint="runs/does_not_exist", train="python -m train.main ..."),
    )
    return c
'''


def test_compare_end_to_end_on_synthetic_scans(tmp_path, synthetic_data):
    cfg = tmp_path / "cmp.py"
    cfg.write_text(CONFIG)
    out = tmp_path / "out"
    assert main(["compare", "--config", str(cfg), "--out", str(out), "--data", str(synthetic_data), "--quiet"]) == 0
    md = (out / "results.md").read_text()
    assert "## known" in md and "## inter" in md and "| headers |" in md and "| io-mind short |" in md
    assert "**CAR**: not trained here: no checkpoint at runs/does_not_exist" in md
    rows = list(csv.DictReader((out / "per_pair.csv").open()))
    assert len(rows) == 2 * (1 + 2)  # 2 methods x (1 known pair + 2 inter-subject pairs)
    summary = json.loads((out / "results.json").read_text())["summary"]
    head, reg = summary["known"]["headers"], summary["known"]["io-mind short"]
    assert head["epe_mm"] > 1.0 and head["folding_percent"] == 0.0 and head["time_s"] == 0.0
    assert reg["epe_mm"] < head["epe_mm"] and reg["folding_percent"] < 0.5  # registration recovers part of it
    assert summary["inter"]["headers"]["dice"] < 1.0 and summary["inter"]["headers"]["hd95_mm"] > 0
    assert not list(tmp_path.glob(".jaxreg_compare_*"))  # the prepared pairs are removed
    # again without --overwrite: refused, nothing changed
    assert main(["compare", "--config", str(cfg), "--out", str(out), "--data", str(synthetic_data), "--quiet"]) != 0
    assert (out / "results.md").read_text() == md


@pytest.mark.parametrize("extra, message", [
    (["--methods", "nope"], "unknown method nope"),
    (["--sets", "nope"], "unknown pair set nope"),
])
def test_compare_rejects_unknown_names_and_writes_nothing(tmp_path, synthetic_data, capsys, extra, message):
    cfg = tmp_path / "cmp.py"
    cfg.write_text(CONFIG)
    out = tmp_path / "out"
    code = main(["compare", "--config", str(cfg), "--out", str(out), "--data", str(synthetic_data), "--quiet", *extra])
    assert code == 2 and message in capsys.readouterr().err and not out.exists()


def test_compare_config_errors(tmp_path, capsys):
    assert main(["compare", "--config", str(tmp_path / "missing.py"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    assert main(["compare", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "get_config" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.realdata
def test_compare_prepares_the_real_pairs_and_scores_the_headers(tmp_path, data_dir):
    """The brain config's known-deformation and IXI sets on the real scans, headers only (no registration)."""
    out = tmp_path / "out"
    assert main(["compare", "--config", str(ROOT / "configs" / "compare_brain.py") + ":quick", "--out", str(out),
                 "--data", str(data_dir), "--methods", "headers (no registration)", "--sets", "brats_known,ixi_mono",
                 "--quiet"]) == 0
    s = json.loads((out / "results.json").read_text())["summary"]
    brats, ixi = s["brats_known"]["headers (no registration)"], s["ixi_mono"]["headers (no registration)"]
    assert 2.0 < brats["epe_mm"] < 3.0  # the 2.5 mm mean deformation, inside the brain
    assert 0.0 < ixi["dice"] < 0.2 and ixi["hd95_mm"] > 5  # IXI scans are far apart through their headers


def test_compare_update_reruns_one_method_and_keeps_the_other_rows(tmp_path, synthetic_data):
    cfg = tmp_path / "cmp.py"
    cfg.write_text(CONFIG)
    out = tmp_path / "out"
    base = ["compare", "--config", str(cfg), "--out", str(out), "--data", str(synthetic_data), "--quiet",
            "--sets", "inter"]
    assert main(base + ["--update"]) == 2  # nothing to update yet
    assert main(base + ["--methods", "headers"]) == 0
    first = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in first["rows"]} == {"headers"}
    assert main(base + ["--methods", "io-mind short,CAR", "--update"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r for r in res["rows"] if r["method"] == "headers"] == first["rows"]  # kept as they were
    assert len([r for r in res["rows"] if r["method"] == "io-mind short"]) == 2
    assert [s[0] for s in res["skipped"]] == ["CAR"] and len(res["meta"]["updates"]) == 1
    md = (out / "results.md").read_text()
    assert md.index("| headers |") < md.index("| io-mind short |") and "Updated: `jaxreg compare" in md
