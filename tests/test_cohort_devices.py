"""`jaxreg register --moving a b c d --devices N`: a cohort spread over several devices gives exactly the
single-device results (4 simulated CPU devices, in a subprocess since the device count is fixed at start)."""
import json
import os
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from tests.test_cli import FAST, _blobs, _save

REPO = pathlib.Path(__file__).resolve().parents[1]


def _register(args, devices_flag):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAXREG_CACHE_DIR="",
               PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "jaxreg.cli", "register", *args, *devices_flag], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cohort_on_four_devices_equals_one_device(tmp_path):
    fixed = _save(tmp_path / "fixed.nii.gz", _blobs())
    movings = [_save(tmp_path / f"m{k}.nii.gz", 1.0 - _blobs(shift=(0.5 * k, -1.0, 0.3 * k))) for k in range(4)]
    runs = {}
    for n in (1, 4):
        out = tmp_path / f"out{n}"
        res = _register(["--fixed", fixed, "--moving", *movings, "--out", str(out)] + FAST, ["--devices", str(n)])
        assert res.returncode == 0, res.stderr
        runs[n] = out
    used = set()
    for k in range(4):
        one = nib.load(str(runs[1] / f"m{k}" / "warp.nii.gz")).get_fdata()
        four = nib.load(str(runs[4] / f"m{k}" / "warp.nii.gz")).get_fdata()
        np.testing.assert_array_equal(four, one)
        m1 = json.loads((runs[1] / f"m{k}" / "metrics.json").read_text())
        m4 = json.loads((runs[4] / f"m{k}" / "metrics.json").read_text())
        assert m1["device"] == "cpu:0"
        used.add(m4["device"])
        timing = {"device", "runtime_s", "wall_s"}
        assert {k: v for k, v in m4.items() if k not in timing} == {k: v for k, v in m1.items() if k not in timing}
    assert used == {"cpu:0", "cpu:1", "cpu:2", "cpu:3"}


def test_devices_flag_is_validated(tmp_path, capsys):
    from jaxreg.cli import main

    fixed = _save(tmp_path / "fixed.nii.gz", _blobs())
    moving = _save(tmp_path / "moving.nii.gz", 1.0 - _blobs(shift=(1.0, -1.0, 0.5)))
    for bad in ("0", "-2", "x", "99"):
        out = tmp_path / f"out_{bad}"
        assert main(["register", "--fixed", fixed, "--moving", moving, "--out", str(out), "--devices", bad]
                    + FAST) != 0
        assert not out.exists()
    assert "--devices" in capsys.readouterr().err
