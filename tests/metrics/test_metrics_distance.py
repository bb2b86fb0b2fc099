"""HD95: concentric balls, shifted plates with anisotropic spacing, brute-force reference."""
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from jaxreg.metrics import hd95


def _ball(shape, radius, spacing=None):
    spacing = np.ones(len(shape)) if spacing is None else np.asarray(spacing)
    centre = (np.asarray(shape) - 1) / 2.0
    grids = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, centre, spacing)], indexing="ij")
    return (np.sqrt(sum(g ** 2 for g in grids)) <= radius).astype(np.int32)


def _hd95_brute_force(a, b, spacing):
    """Percentile over both directed sets of surface-point distances, by all pairs."""
    st = ndimage.generate_binary_structure(a.ndim, 1)
    pts = []
    for m in (a, b):
        surf = m & ~ndimage.binary_erosion(m, structure=st)
        pts.append(np.argwhere(surf) * np.asarray(spacing))
    d = cdist(pts[0], pts[1])
    return np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95)


@pytest.mark.parametrize("ndim, shape", [(2, (41, 41)), (3, (29, 29, 29))])
@pytest.mark.parametrize("spacing", [1.0, 2.0])
def test_concentric_balls_give_radius_difference(ndim, shape, spacing):
    r1, r2 = 5.0 * spacing, 12.0 * spacing  # radii in mm
    sp = (spacing,) * ndim
    a, b = _ball(shape, r1, sp), _ball(shape, r2, sp)
    h = hd95(a, b, spacing=sp)
    assert h.shape == (1,)
    assert abs(h[0] - (r2 - r1)) <= spacing  # within one voxel
    assert hd95(b, a, spacing=sp)[0] == pytest.approx(h[0])  # symmetric


@pytest.mark.parametrize("ndim, spacing", [(2, (0.7, 1.9)), (3, (0.5, 1.5, 2.5))])
@pytest.mark.parametrize("k", [1, 3])
def test_shifted_plate_respects_anisotropic_spacing(ndim, spacing, k):
    shape = (16,) * ndim
    for axis in range(ndim):
        lo = [3] * ndim
        hi = [12] * ndim
        lo[axis], hi[axis] = 4, 5  # a one-voxel-thick plate normal to `axis`
        a = np.zeros(shape, np.int32)
        a[tuple(slice(x, y) for x, y in zip(lo, hi))] = 2
        b = np.roll(a, k, axis=axis)
        # every surface voxel of one plate is exactly k voxels from the other plate
        np.testing.assert_allclose(hd95(a, b, spacing=spacing), [k * spacing[axis]], rtol=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_matches_brute_force_on_random_multilabel_maps(ndim):
    rng = np.random.default_rng(3 + ndim)
    shape = (24, 20) if ndim == 2 else (14, 12, 10)
    spacing = (1.3, 0.8) if ndim == 2 else (1.3, 0.8, 2.1)

    def blobs():
        noise = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
        return np.digitize(noise, np.quantile(noise, [0.3, 0.55, 0.8])).astype(np.int32)  # labels 0..3, touch borders

    a, b = blobs(), blobs()
    h = hd95(a, b, spacing=spacing)
    ref = [_hd95_brute_force(a == v, b == v, spacing) for v in (1, 2, 3)]
    np.testing.assert_allclose(h, ref, rtol=1e-10)
    assert np.all(h > 0)


def test_many_labels_shared_among_threads_match_brute_force():
    # >= 32 labels: hd95 scores them in several threads (on a machine with more than one core)
    rng = np.random.default_rng(7)
    shape, spacing = (18, 16, 12), (1.1, 0.9, 1.7)
    noise = [ndimage.gaussian_filter(rng.standard_normal(shape), 1.0) for _ in range(2)]
    a, b = (np.digitize(x, np.quantile(x, np.linspace(0.05, 0.95, 40))).astype(np.int32) for x in noise)
    labels = list(range(1, 41)) + [77]  # 77 is in neither map: NaN
    h = hd95(a, b, spacing=spacing, labels=labels)
    ref = [_hd95_brute_force(a == v, b == v, spacing) for v in range(1, 41)]
    np.testing.assert_allclose(h[:-1], ref, rtol=1e-10)
    assert np.isnan(h[-1])


def test_target_surfaces_built_beforehand_give_the_same_hd95():
    from jaxreg.metrics import label_surfaces

    rng = np.random.default_rng(11)
    shape, spacing = (16, 14, 10), (1.2, 1.0, 2.0)
    a, b = (np.digitize(ndimage.gaussian_filter(rng.standard_normal(shape), 1.2), [-0.3, 0.0, 0.4]).astype(np.int32)
            for _ in range(2))
    surfaces = label_surfaces(b, [1, 2, 3, 9], spacing=spacing)  # 9: in neither map
    for labels in ([1, 2, 3], [3, 1], [9, 2]):
        np.testing.assert_array_equal(hd95(a, b, spacing=spacing, labels=labels, target_surfaces=surfaces),
                                      hd95(a, b, spacing=spacing, labels=labels))
    with pytest.raises(ValueError, match="without labels"):
        hd95(a, b, spacing=spacing, labels=[1, 4], target_surfaces=surfaces)
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, b, spacing=(1.0, 1.0, 2.0), labels=[1], target_surfaces=surfaces)
    with pytest.raises(ValueError, match="grid"):
        hd95(a[:-1], b[:-1], spacing=spacing, labels=[1], target_surfaces=surfaces)


def test_identical_zero_and_absent_labels_nan():
    a = np.zeros((10, 10), np.int32)
    a[2:5, 2:5] = 1
    a[6:9, 6:9] = 4
    b = a.copy()
    b[b == 4] = 0
    h = hd95(a, b, spacing=(1.0, 1.0), labels=[1, 4, 7])
    assert h[0] == 0.0  # identical masks
    assert np.isnan(h[1])  # present in pred only
    assert np.isnan(h[2])  # present in neither
    np.testing.assert_array_equal(hd95(a, a, spacing=(1.0, 2.0)), [0.0, 0.0])  # default: labels 1, 4


@pytest.mark.parametrize("kwargs, match", [
    ({"spacing": (1.0,)}, r"shape \(2,\)"),
    ({"spacing": (1.0, -1.0)}, "positive"),
    ({"spacing": (1.0, np.nan)}, "positive"),
    ({"spacing": (1.0, 1.0), "labels": [0.5]}, "labels must be integers"),
])
def test_hd95_bad_arguments(kwargs, match):
    a = np.zeros((5, 5), np.int32)
    with pytest.raises(ValueError, match=match):
        hd95(a, a, **kwargs)


def test_hd95_bad_maps():
    with pytest.raises(ValueError, match=r"\(5, 5\) vs \(5, 6\)"):
        hd95(np.zeros((5, 5), int), np.zeros((5, 6), int), spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="integer label map"):
        hd95(np.zeros((5, 5), np.float32), np.zeros((5, 5), int), spacing=(1.0, 1.0))
