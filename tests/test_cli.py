"""`jaxreg` command line: error cases (exit code, nothing written) and end-to-end runs."""
import json
import os
import pathlib

import nibabel as nib
import numpy as np
import pytest

from jaxreg.cli import main


def _save(path, data, affine=None):
    affine = np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return str(path)


def _blobs(shape=(24, 26, 22), shift=(0.0, 0.0, 0.0)):
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1)
    c = np.asarray(shape, np.float32) / 2 + np.asarray(shift, np.float32)
    img = np.exp(-np.sum((g - c) ** 2, -1) / (2 * 5.0**2))
    img += 0.5 * np.exp(-np.sum((g - c - np.asarray([4, -3, 2])) ** 2, -1) / (2 * 2.5**2))
    return img.astype(np.float32)


@pytest.fixture
def pair(tmp_path):
    fixed = _save(tmp_path / "fixed.nii.gz", _blobs())
    moving = _save(tmp_path / "moving.nii.gz", 1.0 - _blobs(shift=(1.0, -1.0, 0.5)))
    return fixed, moving


FAST = ["--levels", "1", "--iterations", "10", "--resolution", "0", "--quiet"]


def _run(args):
    return main(args)


def _listing(path):
    return sorted(os.listdir(path))


@pytest.mark.parametrize("case", ["nan", "4d", "missing", "constant"])
def test_register_rejects_bad_input_and_writes_nothing(tmp_path, pair, case, capsys):
    fixed, moving = pair
    if case == "nan":
        bad = _blobs()
        bad[3, 3, 3] = np.nan
        moving = _save(tmp_path / "bad.nii.gz", bad)
    elif case == "4d":
        moving = _save(tmp_path / "bad.nii.gz", np.stack([_blobs(), _blobs()], -1))
    elif case == "missing":
        moving = str(tmp_path / "nope.nii.gz")
    else:
        moving = _save(tmp_path / "bad.nii.gz", np.ones((24, 26, 22), np.float32))
    before = _listing(tmp_path)
    code = _run(["register", "--fixed", fixed, "--moving", moving, "--out", str(tmp_path / "out")] + FAST)
    assert code != 0
    err = capsys.readouterr().err
    assert "error" in err and ("bad.nii.gz" in err or "nope.nii.gz" in err)
    assert {"nan": "NaN", "4d": "4D", "missing": "nope", "constant": "constant"}[case] in err
    assert _listing(tmp_path) == before  # no output dir, no temp files


def test_register_rejects_mismatched_labels(tmp_path, pair, capsys):
    fixed, moving = pair
    labels = _save(tmp_path / "labels.nii.gz", np.ones((10, 10, 10), np.int32))
    before = _listing(tmp_path)
    code = _run(["register", "--fixed", fixed, "--moving", moving, "--fixed-labels", labels,
                 "--out", str(tmp_path / "out")] + FAST)
    assert code != 0
    assert "fixed-labels" in capsys.readouterr().err
    assert _listing(tmp_path) == before


def test_register_refuses_to_overwrite(tmp_path, pair, capsys):
    fixed, moving = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "warped.nii.gz").write_bytes(b"user data")
    code = _run(["register", "--fixed", fixed, "--moving", moving, "--out", str(out)] + FAST)
    assert code != 0
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "warped.nii.gz").read_bytes() == b"user data"
    assert _listing(out) == ["warped.nii.gz"]


def test_register_overwrite_removes_outputs_of_the_earlier_run(tmp_path, pair):
    """An earlier run's qc.png and warped_labels.nii.gz do not survive an --overwrite run that writes neither;
    a file of the user's own stays."""
    fixed, moving = pair
    out = tmp_path / "out"
    out.mkdir()
    for name in ("qc.png", "warped_labels.nii.gz", "notes.txt"):
        (out / name).write_bytes(b"old")
    code = _run(["register", "--fixed", fixed, "--moving", moving, "--out", str(out), "--overwrite"] + FAST)
    assert code == 0
    assert _listing(out) == sorted(["warped.nii.gz", "warp.nii.gz", "inverse_warp.nii.gz", "metrics.json",
                                    "notes.txt"])
    assert (out / "notes.txt").read_bytes() == b"old"


def test_register_end_to_end_synthetic_and_ants_agrees(tmp_path):
    """Moving on a different grid (flipped axis, other spacing): outputs, metrics and ITK interop."""
    ants = pytest.importorskip("ants")
    fixed = _save(tmp_path / "fixed.nii.gz", _blobs())
    labels = (_blobs() > 0.4).astype(np.int32) + (_blobs() > 0.8).astype(np.int32)
    fixed_labels = _save(tmp_path / "fixed_labels.nii.gz", labels)
    # Moving: same world content, axis 0 flipped and a 1.5 mm shift in the affine.
    aff_m = np.diag([-2.0, 2.0, 2.0, 1.0])
    aff_m[0, 3] = 2.0 * (24 - 1) + 1.5
    moving = _save(tmp_path / "moving.nii.gz", _blobs()[::-1].copy(), aff_m)
    moving_labels = _save(tmp_path / "moving_labels.nii.gz", labels[::-1].copy(), aff_m)
    out = tmp_path / "out"
    code = _run(["register", "--fixed", fixed, "--moving", moving, "--out", str(out), "--method", "io-mse",
                 "--fixed-labels", fixed_labels, "--moving-labels", moving_labels, "--levels", "2",
                 "--iterations", "30,30", "--resolution", "0", "--quiet", "--qc"])
    assert code == 0
    assert _listing(out) == sorted(["warped.nii.gz", "warp.nii.gz", "inverse_warp.nii.gz",
                                    "warped_labels.nii.gz", "metrics.json", "qc.png"])
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("method", "runtime_s", "similarity_before", "similarity_after", "folding_percent", "sdlogj",
                "dice", "dice_mean", "hd95_mm"):
        assert key in metrics
    assert metrics["folding_percent"] < 0.5
    assert metrics["dice_mean"] > max(0.9, metrics["dice_mean_before"] + 0.05)
    assert metrics["similarity_after"] < metrics["similarity_before"]
    warped = nib.load(str(out / "warped.nii.gz"))
    np.testing.assert_allclose(warped.affine, nib.load(fixed).affine)
    ours = warped.get_fdata()
    theirs = ants.apply_transforms(ants.image_read(fixed), ants.image_read(moving),
                                   [str(out / "warp.nii.gz")]).numpy()
    inner = (slice(2, -2),) * 3
    assert np.max(np.abs(ours - theirs)[inner]) < 1e-3 * np.ptp(ours)
    # `jaxreg apply` reproduces the warped image and labels.
    code = _run(["apply", "--transform", str(out / "warp.nii.gz"), "--image", moving, "--reference", fixed,
                 "--out", str(tmp_path / "applied.nii.gz")])
    assert code == 0
    applied = nib.load(str(tmp_path / "applied.nii.gz")).get_fdata()
    assert np.max(np.abs(applied - ours)[inner]) < 1e-3 * np.ptp(ours)
    code = _run(["apply", "--transform", str(out / "warp.nii.gz"), "--image", moving_labels, "--reference",
                 fixed, "--out", str(tmp_path / "applied_labels.nii.gz"), "--labels"])
    assert code == 0
    applied_labels = np.asarray(nib.load(str(tmp_path / "applied_labels.nii.gz")).dataobj)
    warped_labels = np.asarray(nib.load(str(out / "warped_labels.nii.gz")).dataobj)
    assert np.mean(applied_labels[inner] == warped_labels[inner]) > 0.99
    # Re-running without --overwrite fails and leaves the outputs alone.
    stamp = (out / "metrics.json").read_bytes()
    assert _run(["register", "--fixed", fixed, "--moving", moving, "--out", str(out)] + FAST) != 0
    assert (out / "metrics.json").read_bytes() == stamp


def test_apply_errors(tmp_path, pair, capsys):
    fixed, moving = pair
    out = tmp_path / "x.nii.gz"
    code = _run(["apply", "--transform", str(tmp_path / "nowarp.nii.gz"), "--image", moving, "--reference",
                 fixed, "--out", str(out)])
    assert code != 0 and not out.exists()
    assert "nowarp" in capsys.readouterr().err
    out.write_bytes(b"keep")
    code = _run(["apply", "--transform", fixed, "--image", moving, "--reference", fixed, "--out", str(out)])
    assert code != 0 and out.read_bytes() == b"keep"


@pytest.mark.parametrize("init", ["auto", "header", "com"])
def test_register_init_option_reaches_the_affine_stage(init):
    from jaxreg.cli import _registration_runner, build_parser

    args = build_parser().parse_args(["register", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--out", "o",
                                      "--transform", "rigid", "--init", init])
    _, config, _ = _registration_runner(args, lambda _: None)
    assert config.affine_init == init and config.transform == "rigid"


def test_register_rejects_an_unknown_init(capsys):
    with pytest.raises(SystemExit) as e:
        main(["register", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--out", "o", "--init", "pca"])
    assert e.value.code != 0 and "--init" in capsys.readouterr().err


def test_register_cohort_writes_one_folder_per_moving_scan_equal_to_single_runs(tmp_path, pair):
    fixed, moving = pair
    second = _save(tmp_path / "second.nii.gz", 1.0 - _blobs(shift=(-1.0, 0.5, 1.0)))
    assert _run(["register", "--fixed", fixed, "--moving", moving, second, "--out", str(tmp_path / "cohort")]
                + FAST) == 0
    assert _listing(tmp_path / "cohort") == ["moving", "second"]
    for name, path in (("moving", moving), ("second", second)):
        assert _run(["register", "--fixed", fixed, "--moving", path, "--out", str(tmp_path / f"one_{name}")]
                    + FAST) == 0
        assert _listing(tmp_path / "cohort" / name) == _listing(tmp_path / f"one_{name}")
        a = nib.load(str(tmp_path / "cohort" / name / "warp.nii.gz")).get_fdata()
        b = nib.load(str(tmp_path / f"one_{name}" / "warp.nii.gz")).get_fdata()
        np.testing.assert_array_equal(a, b)


def test_register_cohort_bad_pair_writes_nothing_for_it_and_fails(tmp_path, pair, capsys):
    fixed, moving = pair
    bad = _save(tmp_path / "bad.nii.gz", np.ones((24, 26, 22), np.float32))  # constant: rejected at load
    code = _run(["register", "--fixed", fixed, "--moving", bad, moving, "--out", str(tmp_path / "cohort")] + FAST)
    assert code != 0
    err = capsys.readouterr().err
    assert "bad.nii.gz" in err and "1 of 2 pairs failed" in err
    assert _listing(tmp_path / "cohort") == ["moving"]  # the good pair is written, nothing of the bad one
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


@pytest.mark.parametrize("case", ["same names", "labels count", "missing"])
def test_register_cohort_checks_every_input_before_any_work(tmp_path, pair, capsys, case):
    fixed, moving = pair
    other = tmp_path / "sub"
    other.mkdir()
    extra = {"same names": [_save(other / "moving.nii.gz", _blobs())],
             "labels count": [moving, "--moving-labels", _save(tmp_path / "l.nii.gz", np.ones((24, 26, 22), np.int32))],
             "missing": [str(tmp_path / "nope.nii.gz")]}[case]
    before = _listing(tmp_path)
    code = _run(["register", "--fixed", fixed, "--moving", moving, *extra, "--out", str(tmp_path / "cohort")] + FAST)
    assert code != 0
    err = capsys.readouterr().err
    assert {"same names": "share the name", "labels count": "one label map per", "missing": "nope.nii.gz"}[case] in err
    assert _listing(tmp_path) == before


def test_demo_uses_the_library_not_the_cli():
    """jaxreg.demo runs on pipeline + outputs; importing it does not import jaxreg.cli (issue 18.6)."""
    import subprocess
    import sys

    code = "import sys, jaxreg.demo, jaxreg.outputs; print('jaxreg.cli' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    src = (pathlib.Path(__file__).parents[1] / "jaxreg" / "demo.py").read_text()
    assert "jaxreg.cli" not in src


TUNE_SCRIPT = """
import sys
from jax._src import xla_bridge
from jaxreg import cli, programs
started = []
cli._tune_malloc = lambda: started.append(sorted(xla_bridge._backends)) or True
programs.manifest_stored = lambda tag: sys.argv[1] == "stored"
cli._OWN_PROCESS = sys.argv[2] == "entry"
class Stop(Exception):
    pass
def stop(*args, **kwargs):
    raise Stop
cli._cohort_devices = stop  # the first step that starts JAX
try:
    cli.main(["register", "--fixed", sys.argv[3], "--moving", sys.argv[4], "--out", sys.argv[5], "--quiet"])
except Stop:
    pass
print(started)
"""


@pytest.mark.parametrize("stored, process, tuned", [("stored", "entry", True), ("new", "entry", False),
                                                    ("stored", "library", False)])
def test_malloc_is_tuned_only_for_a_stored_job_of_the_console_script(pair, tmp_path, stored, process, tuned):
    """Issue 18: the console script tunes malloc (one arena) when the job compiles nothing, before JAX starts
    (no backend yet); a job that compiles, or main() called from a user's process, leaves it alone."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", TUNE_SCRIPT, stored, process, *pair, str(tmp_path / "o")],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("[[]]" if tuned else "[]")


def test_tune_malloc_on_glibc():
    """The settings are accepted by this process's malloc (run in a child: they last for its lifetime)."""
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    code = "from jaxreg.cli import _tune_malloc; import numpy as np; ok = _tune_malloc(); " \
           "x = np.ones(50_000_000); del x; y = np.ones(50_000_000); print(ok, y.sum())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "50000000.0"]


def test_console_script_runs_numpy_blas_on_one_thread():
    """Issue 18: jaxreg.__main__ (the console script) sets OPENBLAS_NUM_THREADS=1 before numpy loads, unless the
    user set it."""
    import subprocess
    import sys

    code = """
import os, sys, types
fake = types.ModuleType("jaxreg.cli")
def entry():
    import numpy, threadpoolctl
    blas = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["internal_api"] == "openblas"]
    print(os.environ["OPENBLAS_NUM_THREADS"], sorted(set(blas)))
fake.entry = entry
sys.modules["jaxreg.cli"] = fake
from jaxreg.__main__ import entry as script
script()
"""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split(None, 1)[0] == "1" and out.split(None, 1)[1].strip() in ("[1]", "[]")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "OPENBLAS_NUM_THREADS": "2"}).stdout
    assert out.split()[0] == "2"
