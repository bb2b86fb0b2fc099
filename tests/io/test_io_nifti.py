"""NIfTI load/save: round trips, overwrite/atomicity, and boundary validation."""
import os

import nibabel as nib
import numpy as np
import pytest

from jaxreg.io import Volume, load_image, load_labels, save_image
from jaxreg.io import nifti as nifti_mod


def _affine():
    a = np.array([[0.0, -1.2, 0.1, 10.0], [0.9, 0.0, 0.0, -5.0], [0.0, 0.05, 2.0, 3.5], [0, 0, 0, 1]])
    return a


def _raw_save(path, data, affine=None, **header):
    """Write a NIfTI file with nibabel directly (no jaxreg validation)."""
    img = nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine)
    for k, v in header.items():
        img.header[k] = v
    nib.save(img, path)
    return path


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("shape", [(7, 8, 9), (7, 8), (7, 8, 1)])
def test_round_trip_keeps_data_and_affine(tmp_path, suffix, shape):
    rng = np.random.default_rng(0)
    data = rng.normal(size=shape).astype(np.float32)
    path = save_image(tmp_path / f"img{suffix}", data, _affine())
    vol = load_image(path)
    assert isinstance(vol, Volume)
    assert vol.data.shape == shape  # (X, Y, 1) stays a one-slice 3D image
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, data)
    # sform is stored as float32: exact to float32 precision.
    np.testing.assert_allclose(vol.affine, _affine(), atol=1e-6)
    hdr = nib.load(path).header
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1


def test_qform_equals_sform_for_orthogonal_affine(tmp_path):
    """Readers that prefer the qform (or ITK, which checks both) see the same grid."""
    c, s = np.cos(0.4), np.sin(0.4)
    rot = np.array([[c, 0.0, -s, 4.0], [0.0, 1.0, 0.0, -3.0], [s, 0.0, c, 2.0], [0, 0, 0, 1]])
    a = rot @ np.diag([0.9, 1.1, 2.5, 1])
    path = save_image(tmp_path / "o.nii.gz", np.random.default_rng(0).random((4, 5, 6)), a)
    hdr = nib.load(path).header
    np.testing.assert_allclose(hdr.get_qform(), a, atol=1e-5)
    np.testing.assert_allclose(hdr.get_sform(), a, atol=1e-5)


def test_round_trip_dtype_and_intent(tmp_path):
    labels = np.arange(60).reshape(3, 4, 5) % 7
    path = save_image(tmp_path / "lab.nii.gz", labels, np.eye(4), dtype=np.uint8, intent="label")
    img = nib.load(path)
    assert img.get_data_dtype() == np.uint8
    assert int(img.header["intent_code"]) == 1002  # NIFTI_INTENT_LABEL
    vol = load_labels(path)
    assert vol.data.dtype == np.int32
    np.testing.assert_array_equal(vol.data, labels)


def test_trailing_singleton_axes_are_squeezed(tmp_path):
    data = np.random.default_rng(1).random((5, 6, 7, 1, 1)).astype(np.float32)
    vol = load_image(_raw_save(tmp_path / "a.nii.gz", data))
    assert vol.data.shape == (5, 6, 7)


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "img.nii.gz"
    save_image(path, np.arange(24.0).reshape(2, 3, 4), np.eye(4))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_image(path, np.ones((2, 3, 4)) * 5, np.eye(4))
    np.testing.assert_array_equal(load_image(path).data, np.arange(24.0).reshape(2, 3, 4))
    save_image(path, np.arange(24.0).reshape(2, 3, 4) * 2, np.eye(4), overwrite=True)
    np.testing.assert_array_equal(load_image(path).data, np.arange(24.0).reshape(2, 3, 4) * 2)
    assert sorted(os.listdir(tmp_path)) == ["img.nii.gz"]


def test_failed_write_leaves_no_temp_and_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "img.nii.gz"
    save_image(path, np.arange(24.0).reshape(2, 3, 4), np.eye(4))

    def broken_save(img, filename):
        with open(filename, "wb") as f:  # a partial file, then a crash
            f.write(b"partial")
        raise OSError("disk full")

    def broken_gzip_open(filename, mode, **kwargs):  # .nii.gz is compressed by ISA-L's igzip
        broken_save(None, filename)

    monkeypatch.setattr(nifti_mod.nib, "save", broken_save)
    monkeypatch.setattr(nifti_mod.igzip, "open", broken_gzip_open)
    with pytest.raises(OSError, match="disk full"):
        save_image(path, np.zeros((2, 3, 4)), np.eye(4), overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        save_image(tmp_path / "new.nii", np.zeros((2, 3, 4)), np.eye(4))
    assert sorted(os.listdir(tmp_path)) == ["img.nii.gz"]
    monkeypatch.undo()
    np.testing.assert_array_equal(load_image(path).data, np.arange(24.0).reshape(2, 3, 4))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(data=np.ones((3, 4, 5)), affine=np.eye(4), name="x.img"), ValueError, r"\.nii or \.nii\.gz"),
        (dict(data=np.full((3, 4, 5), np.nan), affine=np.eye(4)), ValueError, "NaN/Inf"),
        (dict(data=np.ones((3, 4, 5)), affine=np.diag([1.0, 1.0, 0.0, 1.0])), ValueError, "not invertible"),
        (dict(data=np.ones((3, 4, 5)), affine=np.eye(3)), ValueError, r"\(4, 4\)"),
        (dict(data=np.ones((3, 4, 5)), affine=np.eye(4), name="missing_dir/x.nii"),
         FileNotFoundError, "does not exist"),
    ],
)
def test_save_rejects_bad_input(tmp_path, kwargs, exc, match):
    name = kwargs.pop("name", "x.nii.gz")
    with pytest.raises(exc, match=match):
        save_image(tmp_path / name, **kwargs)
    assert not any(p.name.endswith((".nii", ".nii.gz")) for p in tmp_path.iterdir())


def _nan_image(path):
    data = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    return _raw_save(path, data)


def _four_d(path):
    return _raw_save(path, np.random.default_rng(0).random((4, 5, 6, 2)).astype(np.float32))


def _constant(path):
    return _raw_save(path, np.full((4, 5, 6), 3.0, np.float32))


def _empty(path):
    return _raw_save(path, np.zeros((0, 5, 6), np.float32))


def _singular(path):
    img = nib.Nifti1Image(np.random.default_rng(0).random((4, 5, 6)).astype(np.float32), None)
    img.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)
    img.set_qform(None, code=0)
    nib.save(img, path)
    return path


def _garbage(path):
    path.write_bytes(b"this is not a nifti file" * 20)
    return path


def _one_d(path):
    return _raw_save(path, np.arange(10, dtype=np.float32))


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda p: p, FileNotFoundError, "no such file"),
        (_garbage, ValueError, "cannot read as a NIfTI"),
        (_nan_image, ValueError, "2 NaN/Inf voxels"),
        (_four_d, ValueError, r"4D with shape \(4, 5, 6, 2\)"),
        (_constant, ValueError, "image is constant"),
        (_empty, ValueError, "empty"),
        (_singular, ValueError, "not invertible"),
        (_one_d, ValueError, "1D"),
    ],
    ids=["missing", "garbage", "nan", "4d", "constant", "empty", "singular_affine", "1d"],
)
def test_load_image_rejects_bad_files(tmp_path, make, exc, match):
    path = make(tmp_path / "bad.nii.gz")
    with pytest.raises(exc, match=match) as info:
        load_image(path)
    assert "bad.nii.gz" in str(info.value)  # the message names the file


def test_load_labels_rejects_fractions(tmp_path):
    data = np.zeros((4, 5, 6), np.float32)
    data[1:3, 1:3, 1:3] = 2.0
    data[0, 0, 0] = 0.5
    path = _raw_save(tmp_path / "lab.nii.gz", data)
    with pytest.raises(ValueError, match=r"lab\.nii\.gz: label map has 1 non-integer voxels \(e\.g\. 0\.5\)"):
        load_labels(path)


def test_load_labels_accepts_integer_valued_floats_and_scaling(tmp_path):
    data = np.zeros((4, 5, 6), np.float32)
    data[1:3, 1:3, 1:3] = 35.0
    vol = load_labels(_raw_save(tmp_path / "lab.nii.gz", data))
    assert vol.data.dtype == np.int32
    np.testing.assert_array_equal(vol.data, data.astype(np.int32))
    # scl_slope/scl_inter are applied (also by load_image)
    raw = np.arange(120, dtype=np.int16).reshape(4, 5, 6)
    path = _raw_save(tmp_path / "scaled.nii.gz", raw, scl_slope=2.0, scl_inter=1.0)
    np.testing.assert_array_equal(load_labels(path).data, raw * 2 + 1)
    np.testing.assert_allclose(load_image(path).data, raw * 2.0 + 1.0)


def test_load_labels_rejects_nan_and_4d(tmp_path):
    with pytest.raises(ValueError, match="NaN/Inf"):
        load_labels(_nan_image(tmp_path / "a.nii.gz"))
    with pytest.raises(ValueError, match="4D"):
        load_labels(_four_d(tmp_path / "b.nii.gz"))


def test_gzip_output_is_a_standard_gzip_stream(tmp_path):
    import gzip

    data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    path = save_image(tmp_path / "img.nii.gz", data, _affine())
    with gzip.open(path, "rb") as f:  # the standard library reads what ISA-L wrote
        raw = f.read()
    img = nib.Nifti1Image.from_bytes(raw)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), data)
