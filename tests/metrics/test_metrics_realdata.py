"""Metrics on real IXI DLMUSE parcellations (148 labels, 120x120x90, 2 mm)."""
import time

import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg.metrics import dice, dice30, dice_jax, dice_mean, hd95

pytestmark = [pytest.mark.slow, pytest.mark.realdata]


@pytest.fixture(scope="module")
def ixi_pair(data_dir):
    nib = pytest.importorskip("nibabel")
    files = sorted((data_dir / "ixi").glob("*_labels.nii.gz"))
    assert len(files) >= 2, f"need two IXI label maps under {data_dir / 'ixi'}"
    imgs = [nib.load(str(f)) for f in files[:2]]
    maps = [np.asarray(img.dataobj) for img in imgs]
    spacing = tuple(float(z) for z in imgs[0].header.get_zooms()[:3])
    return maps[0], maps[1], spacing


def test_dice_real_labels(ixi_pair):
    a, b, _ = ixi_pair
    self_dice = dice(a, a)
    assert self_dice.shape == (148,)
    np.testing.assert_array_equal(self_dice, 1.0)
    d = dice(a, b)
    assert d.shape == (148,) and np.all(np.isfinite(d))
    # two unregistered subjects: partial overlap, never perfect, worst labels below the mean
    assert 0.0 < dice_mean(d) < 0.9
    assert 0.0 <= dice30(d) < dice_mean(d)
    labels = tuple(int(v) for v in np.unique(a) if v != 0)
    np.testing.assert_allclose(np.asarray(dice_jax(jnp.asarray(a), jnp.asarray(b), labels=labels)), d, atol=1e-6)


def test_hd95_real_labels(ixi_pair):
    a, b, spacing = ixi_pair
    assert spacing == (2.0, 2.0, 2.0)
    np.testing.assert_array_equal(hd95(a, a, spacing=spacing), np.zeros(148))
    t0 = time.perf_counter()
    h = hd95(a, b, spacing=spacing)
    elapsed = time.perf_counter() - t0
    assert elapsed < 30.0, f"hd95 on 148 labels took {elapsed:.1f} s"
    assert h.shape == (148,)
    assert np.all(np.isfinite(h)) and np.all(h > 0)
    # unregistered subjects: a few voxels off on average, never beyond the field of view (240 mm)
    assert 2.0 < h.mean() < 50.0 and h.max() < 240.0
