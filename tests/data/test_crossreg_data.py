"""Several moving contrasts per source (one contrast pair per block), inter-subject mixing, and SliceSource."""
import numpy as np
import pytest

from jaxreg.data import PairSource, SubjectData
from jaxreg.data.slices import SliceSource, central_slice_examples


def _subjects(n=3, shape=(16, 20, 12)):
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        img = rng.uniform(0.1, 1, shape + (1,)).astype(np.float32)
        out.append(SubjectData(f"s{k}", {"t1": img, "t2": 1 - img, "flair": img ** 2},
                               rng.integers(0, 3, shape).astype(np.int32)))
    return out


def test_moving_contrast_is_drawn_per_block_and_indexed():
    subs = _subjects()
    names = ("t1", "t2", "flair")
    src = PairSource(subs, mode="intra", moving_contrast=("t2", "flair"), contrast_block=4, contrast_names=names,
                     seed=3, slice_axis=2)
    idx = [int(src[i]["moving_contrast"]) for i in range(40)]
    assert set(idx) == {1, 2}
    for b in range(10):  # one contrast per block of 4 consecutive examples
        assert len(set(idx[4 * b:4 * b + 4])) == 1
    assert all(int(src[i]["fixed_contrast"]) == 0 for i in range(5))
    ex = src[0]  # the moving image is that contrast of the subject (no deformation here)
    c = names[int(ex["moving_contrast"])]
    assert any(np.allclose(ex["moving"], np.take(s.images[c], k, axis=2)) for s in subs for k in range(12))
    # deterministic, and flips keep the scalar indices
    flipped = PairSource(subs, mode="intra", moving_contrast=("t2", "flair"), contrast_block=4, contrast_names=names,
                         seed=3, slice_axis=2, flip=True)
    assert [int(flipped[i]["moving_contrast"]) for i in range(40)] == idx


def test_inter_prob_mixes_in_other_subjects():
    subs = _subjects()
    src = PairSource(subs, mode="intra", moving_contrast="t2", inter_prob=1.0, seed=0)
    for i in range(6):  # inter-subject: moving is 1 - another subject's t1, never this fixed one's
        ex = src[i]
        assert not np.allclose(ex["moving"], 1 - ex["fixed"])
    same = PairSource(subs, mode="intra", moving_contrast="t2", seed=0)
    assert all(np.allclose(same[i]["moving"], 1 - same[i]["fixed"]) for i in range(6))


def test_contrast_errors():
    subs = _subjects()
    with pytest.raises(ValueError, match="contrast_names"):
        PairSource(subs, mode="intra", moving_contrast=("t2", "pd"), contrast_names=("t1", "t2"))
    with pytest.raises(ValueError, match="no contrast 'pd'"):
        PairSource(subs, mode="intra", moving_contrast=("t2", "pd"))
    with pytest.raises(ValueError, match="contrast_block"):
        PairSource(subs, mode="intra", moving_contrast="t2", contrast_block=0)
    with pytest.raises(ValueError, match="inter_prob"):
        PairSource(subs[:1], mode="intra", moving_contrast="t2", inter_prob=0.5)


def test_slice_source_stacks_contrasts_with_labels_and_flips():
    subs = _subjects()
    src = SliceSource(subs, contrasts=("t1", "t2"), slice_axis=2, with_labels=True, flip=True, seed=1)
    ex = src[5]
    assert ex["images"].shape == (16, 20, 2) and ex["labels"].shape == (16, 20)
    np.testing.assert_allclose(ex["images"][..., 1], 1 - ex["images"][..., 0], atol=1e-6)
    np.testing.assert_array_equal(src[5]["images"], ex["images"])
    vol = SliceSource(subs, contrasts=("t1",), slice_axis=None, flip=False)[0]
    assert vol["images"].shape == (16, 20, 12, 1) and "labels" not in vol
    val = central_slice_examples(subs, contrasts=("t1", "t2"), num_slices=2, with_labels=True)
    assert len(val) == 6 and val[0]["images"].shape == (16, 20, 2)
    with pytest.raises(ValueError, match="lacks contrasts"):
        SliceSource(subs, contrasts=("pd",))
    with pytest.raises(ValueError, match="no labels"):
        SliceSource([SubjectData("x", {"t1": subs[0].images["t1"]}, None)], contrasts=("t1",), with_labels=True)
