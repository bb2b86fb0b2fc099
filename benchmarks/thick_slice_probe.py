#!/usr/bin/env python
"""Controlled probe for issue 17: does the default svf bend a purely rigid pair whose scans have thick slices?

On ms_native/patient01 the default ``jaxreg register`` (svf) ends 0.6-0.9 mm from the reference
transforms on same-subject pairs, where the rigid stage reaches 0.2-0.6 mm. Those scans have 3-4 mm
slices at different positions and directions. This probe makes a pair with exact, rigid truth from a
real scan and varies only the acquisition:

- source: IXI002's T1 (1.2 x 0.94 x 0.94 mm, ``$JAXREG_DATA/ixi_t2/IXI002/t1.nii.gz``);
- fixed: the source on an axial grid with 0.9 mm pixels, each voxel the mean over a ``--fixed-slab`` mm
  slab (linear sampling every 0.5 mm across the slab);
- moving: the source moved by a known rigid world map (rotation 3, -2, 4 degrees, translation 6, -4,
  3 mm), on a grid tilted by 6, -4, 3 degrees, with ``--moving-slab`` mm slabs;
- optional Gaussian noise (fraction of the 99th percentile), independent in the two scans.

It registers with ``config_for("io-mind", transform=T)`` on the CLI's working grid and scores the
distance (mean and max over the head) between the recovered and the true moving point of every fixed
voxel, as ``tests/test_rigid_realdata.py`` does.

Usage::

    .venv/bin/python benchmarks/thick_slice_probe.py                         # 4 mm against 3 mm slabs
    .venv/bin/python benchmarks/thick_slice_probe.py --fixed-slab 1 --moving-slab 1 --spacing 1

Measured (2026-12-04, docs/experiments/issue17_regularity.md, last section): rigid 0.047 mm, svf 0.78 mm
(max 3.1) with 4 / 3 mm slabs; svf 0.21 mm with 1 mm slabs on 1 mm grids.
"""
import argparse
import os
import pathlib
import sys

import numpy as np
import scipy.ndimage as ndi
from scipy.spatial.transform import Rotation

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_rigid_realdata import _errors, _world_transform  # noqa: E402

from jaxreg.io import Volume, load_image  # noqa: E402
from jaxreg.pipeline import config_for, register_volumes  # noqa: E402
from jaxreg.spatial import identity_grid  # noqa: E402


def acquire(src: Volume, transform, spacing, tilt_deg, slab_mm, noise, rng) -> Volume:
    """``src`` moved by the world map ``transform`` on a grid tilted by ``tilt_deg`` with voxel size
    ``spacing``, each voxel the mean over ``slab_mm`` along the grid's third axis, plus Gaussian noise."""
    shape_s = np.asarray(src.data.shape)
    center = src.affine[:3, :3] @ ((shape_s - 1) / 2) + src.affine[:3, 3]
    extent = np.abs(src.affine[:3, :3]) @ shape_s
    shape = tuple(int(np.ceil(e / s)) + 4 for e, s in zip(extent, spacing))
    aff = np.eye(4)
    aff[:3, :3] = Rotation.from_rotvec(np.deg2rad(tilt_deg)).as_matrix() @ np.diag(spacing)
    aff[:3, 3] = center - aff[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    x = np.asarray(identity_grid(shape), np.float64).reshape(-1, 3)
    to_src = np.linalg.inv(src.affine) @ np.linalg.inv(transform)  # world -> source voxels
    n_sub = max(1, int(round(slab_mm / 0.5)))
    acc = np.zeros(len(x), np.float32)
    for k in range(n_sub):
        off = np.zeros(3)
        off[2] = ((k + 0.5) / n_sub - 0.5) * slab_mm / spacing[2]
        world = (x + off) @ aff[:3, :3].T + aff[:3, 3]
        vox = world @ to_src[:3, :3].T + to_src[:3, 3]
        acc += ndi.map_coordinates(src.data.astype(np.float32), vox.T, order=1, mode="constant", cval=0.0)
    data = acc.reshape(shape) / n_sub
    if noise:
        data = data + noise * np.percentile(data, 99) * rng.standard_normal(shape).astype(np.float32)
    return Volume(np.maximum(data, 0).astype(np.float32), aff)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("JAXREG_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--fixed-slab", type=float, default=4.0, help="fixed slice thickness and spacing (mm)")
    ap.add_argument("--moving-slab", type=float, default=3.0, help="moving slice thickness and spacing (mm)")
    ap.add_argument("--spacing", type=float, default=0.9, help="in-plane pixel size of both scans (mm)")
    ap.add_argument("--noise", type=float, default=0.0, help="noise sigma as a fraction of the 99th percentile")
    ap.add_argument("--transforms", default="rigid,svf")
    args = ap.parse_args()
    src = load_image(pathlib.Path(args.data) / "ixi_t2" / "IXI002" / "t1.nii.gz")
    rng = np.random.default_rng(0)
    center = src.affine[:3, :3] @ ((np.asarray(src.data.shape) - 1) / 2) + src.affine[:3, 3]
    truth = _world_transform((3.0, -2.0, 4.0), (6.0, -4.0, 3.0), center)
    sp = args.spacing
    fixed = acquire(src, np.eye(4), (sp, sp, args.fixed_slab), (0.0, 0.0, 0.0), args.fixed_slab, args.noise, rng)
    moving = acquire(src, truth, (sp, sp, args.moving_slab), (6.0, -4.0, 3.0), args.moving_slab, args.noise, rng)
    for transform in args.transforms.split(","):
        reg = register_volumes(fixed, moving, config=config_for("io-mind", transform=transform), resolution="auto")
        mean, worst, angle = _errors(reg, fixed, moving, truth)
        print(f"slabs {args.fixed_slab:g} / {args.moving_slab:g} mm, noise {args.noise:g}: {transform}: "
              f"mean {mean:.3f} mm, max {worst:.2f} mm, rotation error {angle:.3f} deg", flush=True)


if __name__ == "__main__":
    main()
