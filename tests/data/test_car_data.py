"""CAR data: known-deformation test pairs (oracle: the true field registers them) and the real-data loader."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg.data.car import central_slices, known_deformation_examples, load_brain_subjects
from jaxreg.data.pipeline import SubjectData
from jaxreg.spatial import warp


def _subject():
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, n) for n in (32, 32, 16)), indexing="ij")
    t1 = np.clip(1.3 - np.sqrt(zz ** 2 + yy ** 2 + xx ** 2), 0, 1) * (0.7 + 0.3 * np.cos(5 * zz) * np.sin(4 * yy))
    t2 = np.where(t1 > 0, 1.0 - t1, 0.0)
    return SubjectData("synthetic", {"t1": t1[..., None].astype(np.float32), "t2": t2[..., None].astype(np.float32)},
                       None)


def test_known_deformation_examples_share_one_field_per_slice_and_the_truth_registers_them():
    ex = known_deformation_examples([_subject()], num_slices=2, deform_voxels=1.5, deform_spacing=8, axis=2)
    assert len(ex) == 4 and [e["contrast"] for e in ex] == ["t1", "t2", "t1", "t2"]
    np.testing.assert_array_equal(ex[0]["disp_true"], ex[1]["disp_true"])  # same deformation for both contrasts
    assert not np.allclose(ex[0]["disp_true"], ex[2]["disp_true"])
    e = ex[0]
    assert e["fixed"].shape == (32, 32, 1) and e["disp_true"].shape == (32, 32, 2)
    before = np.abs(e["moving"] - e["fixed"])[6:-6, 6:-6].mean()
    after = np.abs(np.asarray(warp(jnp.asarray(e["moving"]), jnp.asarray(e["disp_true"]))) - e["fixed"])[6:-6, 6:-6].mean()
    assert after < 0.25 * before
    vol = known_deformation_examples([_subject()], axis=None, deform_voxels=1.0, deform_spacing=8)
    assert len(vol) == 2 and vol[0]["fixed"].shape == (32, 32, 16, 1) and vol[0]["disp_true"].shape == (32, 32, 16, 3)


def test_central_slices_cover_the_central_half_of_the_foreground():
    img = np.zeros((4, 4, 40, 1), np.float32)
    img[:, :, 10:30] = 1.0
    ks = central_slices(img, 3, axis=2)
    assert ks[0] == 14 and ks[-1] == 25 and len(ks) == 3  # foreground 10..29, quarter 4


@pytest.mark.realdata
def test_load_brain_subjects_strips_and_aligns_real_cases(data_dir):
    subjects, shape, affine = load_brain_subjects(data_dir, ["mni152", "ixi/IXI014-HH-1236", "brats_space/brats_gli_00001"],
                                                  resolution=8.0)
    assert shape == (32, 32, 32) and [s.name for s in subjects][0] == "mni152"
    mni, ixi, brats = (s.images["t1"][..., 0] for s in subjects)
    assert set(subjects[2].images) == {"t1", "t2", "flair", "t1c"} and subjects[1].labels is not None
    for img in (mni, ixi, brats):
        assert img.min() >= 0 and img.max() <= 1
        assert (img > 0.05).mean() < 0.45  # skull-stripped brains, not heads filling the box
        ncc = np.corrcoef((img > 0.05).ravel(), (mni > 0.05).ravel())[0, 1]
        assert ncc > 0.75  # brain masks overlap after the centroid + affine alignment (brats' headers are 190 mm off)


@pytest.mark.slow
def test_prealigned_subjects_stay_upright_at_4mm(data_dir):
    """At 4 mm the principal-axes starts turned IXI013 by ~180 degrees onto MNI152 (label Dice with IXI012 0.007):
    the pre-alignment of training subjects uses the upright starts only, so the same labels overlap."""
    from jaxreg.metrics import dice

    subjects, _, _ = load_brain_subjects(data_dir, ["mni152", "ixi/IXI012-HH-1211", "ixi/IXI013-HH-1212"],
                                         resolution=4.0, multiple=16, crop=(48, 64, 48))
    a, b = subjects[1].labels, subjects[2].labels
    assert float(np.nanmean(dice(a, b))) > 0.35  # 0.48 upright; 0.007 with one of them turned
