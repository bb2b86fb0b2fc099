"""ViewSource: deterministic per index, views in voxel correspondence, crops, single-contrast cases."""
import numpy as np
import pytest

from jaxreg.data.views import ViewSource, ViewSubject, shared_data_subjects


def _subject(name, contrasts, shape=(20, 22, 18)):
    rng = np.random.default_rng(0)
    base = np.zeros(shape, np.float32)
    base[4:16, 5:18, 3:15] = rng.random((12, 13, 12)).astype(np.float32) * 0.9 + 0.1
    return ViewSubject(name, {c: (base if i == 0 else np.where(base > 0, 1.1 - base, 0)).astype(np.float32)
                              for i, c in enumerate(contrasts)})


def test_views_are_deterministic_and_corresponding():
    subs = [_subject("a", ("t1", "t2")), _subject("b", ("t1",))]
    src = ViewSource(subs, crop=(16, 16, 16), seed=3, same_prob=0.0)
    for i in range(12):
        ex = src[i]
        assert ex["fixed"].shape == (16, 16, 16, 1) and ex["fixed"].dtype == np.float32
        again = src[i]
        np.testing.assert_array_equal(ex["fixed"], again["fixed"])
        np.testing.assert_array_equal(ex["moving"], again["moving"])
        fg_a, fg_b = ex["fixed"][..., 0] > 0, ex["moving"][..., 0] > 0
        np.testing.assert_array_equal(fg_a, fg_b)  # same crop and flips for both views
        if ex["same"]:
            np.testing.assert_array_equal(ex["fixed"], ex["moving"])
        else:  # the two contrasts of subject a: moving = 1.1 - fixed inside the foreground
            np.testing.assert_allclose(ex["moving"][fg_a], 1.1 - ex["fixed"][fg_a], atol=1e-6)
    assert {float(src[i]["same"]) for i in range(12)} == {0.0, 1.0}  # single-contrast b gives same = 1
    other = ViewSource(subs, crop=(16, 16, 16), seed=4)
    assert any(not np.array_equal(src[i]["fixed"], other[i]["fixed"]) for i in range(5))
    small = ViewSource(subs, crop=(32, 16, 16))[0]  # crop larger than the volume: zero padded
    assert small["fixed"].shape == (32, 16, 16, 1)


def test_shared_data_subjects_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        shared_data_subjects(tmp_path, ["brats_space/nope"])
    with pytest.raises(ValueError, match="at least one"):
        ViewSource([], crop=(8, 8, 8))
