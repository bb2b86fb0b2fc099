#!/usr/bin/env python
"""The ANTs job `benchmarks/cli_speed.py` times as one process: what `jaxreg register` does, with ANTs.

Reads the two scans, registers them with ``ants.registration(type_of_transform="SyN",
aff_metric="mattes", syn_metric="mattes")`` (antspyx defaults otherwise), and writes the warped
image, the composed forward warp (one dense ITK displacement on the fixed grid) and, if given, the
moving labels warped by nearest neighbour.

Usage: ``python benchmarks/_ants_register.py FIXED MOVING OUTDIR [MOVING_LABELS]``
"""
import pathlib
import sys


def main(argv):
    import ants

    fixed_path, moving_path, out = argv[0], argv[1], pathlib.Path(argv[2])
    out.mkdir(parents=True, exist_ok=True)
    f = ants.image_read(fixed_path)
    m = ants.image_read(moving_path)
    reg = ants.registration(f, m, type_of_transform="SyN", aff_metric="mattes", syn_metric="mattes",
                            outprefix=str(out / "ants_"))
    ants.image_write(reg["warpedmovout"], str(out / "warped.nii.gz"))
    ants.apply_transforms(f, m, reg["fwdtransforms"], compose=str(out / "warp_"))
    if len(argv) > 3:
        lab = ants.image_read(argv[3])
        w = ants.apply_transforms(f.clone("float"), lab, reg["fwdtransforms"], interpolator="nearestNeighbor")
        ants.image_write(w, str(out / "warped_labels.nii.gz"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
