"""Data: manifest validation, deterministic pairs and grain pipeline, grid padding."""
import numpy as np
import pytest

from jaxreg.data import (PairSource, SubjectData, make_dataset, padded_grid, random_remap, random_smooth_disp,
                         read_manifest, warp_numpy, write_manifest)
from jaxreg.data.manifest import Subject


def _subjects(n=3, shape=(16, 20, 12), labels=True):
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        img = rng.uniform(0, 1, shape + (1,)).astype(np.float32)
        lab = rng.integers(0, 4, shape).astype(np.int32) if labels else None
        out.append(SubjectData(f"s{k}", {"t1": img, "t2": 1 - img}, lab))
    return out


def test_manifest_roundtrip_and_errors(tmp_path):
    for name in ("a_t1.nii.gz", "a_lab.nii.gz", "b_t1.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    m = write_manifest(tmp_path / "m.csv", [Subject("a", {"t1": tmp_path / "a_t1.nii.gz"}, tmp_path / "a_lab.nii.gz"),
                                            Subject("b", {"t1": tmp_path / "b_t1.nii.gz"})])
    rows = read_manifest(m, contrasts=("t1",))
    assert [r.name for r in rows] == ["a", "b"] and rows[0].labels.name == "a_lab.nii.gz" and rows[1].labels is None
    with pytest.raises(ValueError, match="no label map"):
        read_manifest(m, require_labels=True)
    with pytest.raises(ValueError, match="'t2'"):
        read_manifest(m, contrasts=("t2",))
    (tmp_path / "dup.csv").write_text(f"subject,t1\na,{tmp_path / 'a_t1.nii.gz'}\na,{tmp_path / 'b_t1.nii.gz'}\n")
    with pytest.raises(ValueError, match="duplicate"):
        read_manifest(tmp_path / "dup.csv")
    (tmp_path / "nocol.csv").write_text("name,t1\na,x\n")
    with pytest.raises(ValueError, match="'subject' column"):
        read_manifest(tmp_path / "nocol.csv")
    (tmp_path / "missing.csv").write_text("subject,t1\na,does_not_exist.nii.gz\n")
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        read_manifest(tmp_path / "missing.csv")
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "nope.csv")


def test_pairs_are_deterministic_per_seed_and_index():
    subs = _subjects()
    a = PairSource(subs, seed=3, deform_voxels=1.0, remap_fixed="random")
    b = PairSource(subs, seed=3, deform_voxels=1.0, remap_fixed="random")
    for i in (0, 7, 12345):
        for k in a[i]:
            np.testing.assert_array_equal(a[i][k], b[i][k])
    assert not np.array_equal(a[0]["moving"], a[1]["moving"]) or not np.array_equal(a[0]["fixed"], a[1]["fixed"])
    c = PairSource(subs, seed=4, deform_voxels=1.0, remap_fixed="random")
    assert not np.array_equal(a[0]["fixed"], c[0]["fixed"])


def test_keep_target_holds_the_fixed_image_before_its_remap():
    subs = _subjects()
    plain = PairSource(subs, seed=3)
    kept = PairSource(subs, seed=3, remap_fixed="random", keep_target=True)
    for i in (0, 5):
        ex = kept[i]
        np.testing.assert_array_equal(ex["fixed_target"], plain[i]["fixed"])  # same pair, no remap
        assert not np.allclose(ex["fixed"], ex["fixed_target"])
        np.testing.assert_array_equal(ex["moving"], plain[i]["moving"])
    # remap_prob: about that fraction of the examples is remapped; the others keep their contrast.
    half = PairSource(subs, seed=3, remap_fixed="random", keep_target=True, remap_prob=0.5)
    remapped = [not np.array_equal(half[i]["fixed"], half[i]["fixed_target"]) for i in range(200)]
    assert 0.35 < np.mean(remapped) < 0.65
    with pytest.raises(ValueError, match="remap_prob"):
        PairSource(subs, remap_fixed="random", remap_prob=1.5)
    # Without a remap there is nothing to keep.
    assert "fixed_target" not in PairSource(subs, seed=3, keep_target=True)[0]


def test_grain_pipeline_batches_and_resumes():
    src = PairSource(_subjects(), seed=1, deform_voxels=0.5)
    it = iter(make_dataset(src, batch_size=2))
    first = [next(it) for _ in range(3)]
    assert first[0]["fixed"].shape == (2, 16, 20, 12, 1) and first[0]["moving_labels"].shape == (2, 16, 20, 12)
    np.testing.assert_array_equal(first[1]["moving"][0], src[2]["moving"])  # batch k holds items 2k, 2k+1
    it2 = iter(make_dataset(src, batch_size=2))
    next(it2)
    state = it2.get_state()
    it3 = iter(make_dataset(src, batch_size=2))
    it3.set_state(state)
    np.testing.assert_array_equal(next(it3)["moving"], first[1]["moving"])


def test_modes_slices_and_errors():
    subs = _subjects()
    intra = PairSource(subs, mode="intra", fixed_contrast="t1", moving_contrast="t2", seed=0)
    ex = intra[5]
    np.testing.assert_allclose(ex["moving"], 1 - ex["fixed"], atol=1e-6)  # same subject, other contrast
    sl = PairSource(subs, mode="self", seed=0, slice_axis=2, deform_voxels=1.0)[0]
    assert sl["fixed"].shape == (16, 20, 1) and sl["fixed_labels"].shape == (16, 20)
    with pytest.raises(ValueError, match="mode"):
        PairSource(subs, mode="pairs")
    with pytest.raises(ValueError, match="at least 2"):
        PairSource(subs[:1], mode="inter")
    with pytest.raises(ValueError, match="contrast"):
        PairSource(subs, fixed_contrast="flair")
    with pytest.raises(ValueError, match="batch_size"):
        make_dataset(PairSource(subs), batch_size=0)


def test_labels_follow_the_moving_deformation():
    subs = _subjects(labels=True)
    ex = PairSource(subs, mode="self", seed=0, deform_voxels=1.5)[0]
    # Self pairs: fixed labels = the subject's labels; moving labels = the same labels warped like the image.
    assert ex["moving_labels"].dtype == np.int32 and set(np.unique(ex["moving_labels"])) <= set(range(4))
    assert not np.array_equal(ex["moving_labels"], ex["fixed_labels"])
    assert "disp_true" not in ex  # only validation sources ask for it
    for kw in (dict(mode="self", deform_fixed=True), dict(mode="inter")):
        assert "disp_true" not in PairSource(subs, seed=0, deform_voxels=1.5, keep_truth=True, **kw)[0]


def test_disp_true_registers_a_deformed_self_pair():
    from scipy import ndimage as ndi
    import jax.numpy as jnp
    from jaxreg.spatial import invert

    u = random_smooth_disp(np.random.default_rng(5), (24, 20, 16), magnitude=1.5, spacing=8)
    w = np.asarray(invert(jnp.asarray(u)))
    coords = np.indices(u.shape[:-1], dtype=np.float32) + np.moveaxis(w, -1, 0)
    composed = w + np.stack([ndi.map_coordinates(u[..., k], coords, order=1, mode="nearest") for k in range(3)], -1)
    inner = (slice(4, -4),) * 3
    assert np.abs(composed[inner]).max() < 0.02  # w is u's inverse (up to interpolation)
    # In a pair: the moving image warped by disp_true is the fixed one again (smooth image: small
    # interpolation error), while the unregistered pair differs.
    img = ndi.gaussian_filter(np.random.default_rng(0).uniform(size=(24, 20, 16)), 2).astype(np.float32)[..., None]
    img = (img - img.min()) / (img.max() - img.min())
    ex = PairSource([SubjectData("s", {"t1": img}, None)], mode="self", seed=1, deform_voxels=1.5,
                    deform_spacing=8, keep_truth=True)[0]
    back = warp_numpy(ex["moving"], ex["disp_true"])
    err, before = np.abs(back - ex["fixed"])[inner].mean(), np.abs(ex["moving"] - ex["fixed"])[inner].mean()
    assert err < 0.15 * before, (err, before)


def test_padded_grid_keeps_world_positions():
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    aff[:3, 3] = [10, -4, 7]
    shape, new = padded_grid((30, 17, 16), aff, 16)
    assert shape == (32, 32, 16)
    # Old voxel (0, 0, 0) sits at new voxel ((32-30)//2, (32-17)//2, 0) = (1, 7, 0).
    np.testing.assert_allclose(new @ [1, 7, 0, 1], aff @ [0, 0, 0, 1])


def test_random_smooth_disp_and_remap():
    rng = np.random.default_rng(0)
    u = random_smooth_disp(rng, (32, 24), magnitude=1.5)
    assert u.shape == (32, 24, 2)
    np.testing.assert_allclose(np.mean(np.linalg.norm(u, axis=-1)), 1.5, rtol=1e-4)
    img = np.zeros((8, 8, 1), np.float32)
    img[2:6, 2:6] = 0.5
    out = random_remap(rng, img)
    assert np.all(out[img == 0] == 0) and out.shape == img.shape
    shifted = warp_numpy(img[..., 0], np.full((8, 8, 2), 1.0, np.float32), order=0)
    np.testing.assert_array_equal(shifted[1:5, 1:5], img[2:6, 2:6, 0])


def test_deform_fixed_moves_fixed_image_labels_and_target_together():
    shape = (16, 20, 12)
    lab = (np.indices(shape).sum(0) // 6 % 4).astype(np.int32)  # slabs 6 voxels thick, labels 0..3
    subs = [SubjectData(f"s{k}", {"t1": (lab[..., None] / 3.0).astype(np.float32)}, lab) for k in range(2)]
    plain = PairSource(subs, mode="self", seed=2, deform_voxels=1.5)[0]
    both = PairSource(subs, mode="self", seed=2, deform_voxels=1.5, deform_fixed=True,
                      remap_fixed="random", remap_prob=0.0, keep_target=True)[0]
    np.testing.assert_array_equal(plain["fixed_labels"], lab)  # without deform_fixed the fixed pair is untouched
    assert not np.array_equal(both["fixed_labels"], lab)
    # Image and labels follow one deformation: the linearly warped slab image rounds to the warped labels
    # except at the slab boundaries.
    agree = np.mean(np.round(both["fixed"][..., 0] * 3) == both["fixed_labels"])
    assert agree > 0.8, agree
    np.testing.assert_array_equal(both["fixed_target"], both["fixed"])  # remap_prob 0: target = deformed fixed
    assert not np.array_equal(both["fixed"], both["moving"])  # independent deformations


def test_bspline_basis_is_a_smooth_partition_of_unity():
    from jaxreg.data.pipeline import _bspline_matrix
    for n, spacing in ((80, 16), (17, 4), (5, 16)):
        m = _bspline_matrix(n, spacing)
        np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)
        assert (m >= 0).all() and m.shape[1] == int(np.ceil((n - 1) / spacing)) + 3
    # The interpolated field is smooth: its second difference is tiny against its range.
    u = random_smooth_disp(np.random.default_rng(1), (64,), magnitude=1.0, spacing=16)[:, 0]
    assert np.abs(np.diff(u, 2)).max() < 0.02 * (u.max() - u.min())


def test_flip_mirrors_the_whole_pair_and_its_true_displacement():
    from jaxreg.data.pipeline import flip_example

    img = np.random.default_rng(0).uniform(size=(16, 12, 10, 1)).astype(np.float32)
    src = PairSource([SubjectData("s", {"t1": img}, (img[..., 0] > 0.5).astype(np.int32))], mode="self", seed=4,
                     deform_voxels=1.0, deform_spacing=4, keep_truth=True)
    ex = src[0]
    fl = flip_example(ex, [True, False, True])
    np.testing.assert_array_equal(fl["fixed"], ex["fixed"][::-1, :, ::-1])
    np.testing.assert_array_equal(fl["moving_labels"], ex["moving_labels"][::-1, :, ::-1])
    # The flipped field registers the flipped pair: warping by it equals flipping the warped image.
    np.testing.assert_allclose(warp_numpy(fl["moving"], fl["disp_true"]),
                               warp_numpy(ex["moving"], ex["disp_true"])[::-1, :, ::-1], atol=1e-5)
    assert flip_example(ex, [False] * 3) is ex
    # In the source: some examples are flipped, deterministically per (seed, index).
    flipped = PairSource(src.subjects, mode="self", seed=4, deform_voxels=1.0, deform_spacing=4, flip=True)
    assert not all(np.array_equal(flipped[i]["fixed"], img) for i in range(8))
    for i in range(8):  # labels are mirrored with their image
        np.testing.assert_array_equal(flipped[i]["fixed_labels"], (flipped[i]["fixed"][..., 0] > 0.5).astype(np.int32))
    np.testing.assert_array_equal(flipped[3]["moving"], flipped[3]["moving"])


def test_invert_numpy_equals_the_jax_inverse_and_composes_to_identity():
    import jax.numpy as jnp

    from jaxreg.data.pipeline import invert_numpy, random_smooth_disp
    from jaxreg.spatial import compose, invert

    u = random_smooth_disp(np.random.default_rng(3), (40, 36), magnitude=2.0, spacing=8)
    v = invert_numpy(u)
    np.testing.assert_allclose(v, np.asarray(invert(jnp.asarray(u))), atol=1e-4)
    inner = (slice(6, -6), slice(6, -6))  # away from the border padding
    assert float(np.abs(np.asarray(compose(jnp.asarray(u), jnp.asarray(v)))[inner]).max()) < 0.05


def test_remap_moving_gives_a_named_subject_a_new_contrast_per_example():
    subs = _subjects(labels=False)
    plain = PairSource(subs, mode="intra", moving_contrast="t1", seed=0)
    remapped = PairSource(subs, mode="intra", moving_contrast="t1", seed=0, remap_moving=("s0", "s1", "s2"))
    a, b, b2 = plain[3], remapped[3], remapped[3]
    np.testing.assert_array_equal(a["fixed"], b["fixed"])          # the fixed image is untouched
    np.testing.assert_array_equal(b["moving"], b2["moving"])       # deterministic per index
    assert not np.allclose(a["moving"], b["moving"])
    assert np.all(b["moving"][a["moving"] == 0] == 0)              # background stays 0
    np.testing.assert_array_equal(PairSource(subs, mode="intra", moving_contrast="t1", seed=0,
                                             remap_moving=("other",))[3]["moving"], a["moving"])
