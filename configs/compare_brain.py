"""Every registration method on the same real brain pairs: ``jaxreg compare`` (issue 16).

Command (the full table, ~1 h on the 2 CPU cores; ``docs/results.md`` is its output)::

    .venv/bin/jaxreg compare --config configs/compare_brain.py --out runs/compare
    .venv/bin/jaxreg compare --config configs/compare_brain.py:quick --out /tmp/cmp   # 1 pair per set, 4 methods

Pair sets (``jaxreg.compare``), all on 2 mm grids:

* ``brats_known``: ``brats_space/tcga_fg6692`` T2, FLAIR, T1c -> T1, each
  moving contrast deformed by a seeded smooth diffeomorphism of mean 2.5 mm
  (control points every 16 voxels), as part (a) of
  ``benchmarks/io_registration.py``; tumour labels 1, 2, 4 warped with it.
* ``ms_known``: ``ms_mni/patient19`` T2, FLAIR -> T1 in the same way, with the
  white-matter lesion mask (label 1).
* ``ixi_mono``: IXI012 <-> IXI013 T1 (with skull, 148 DLMUSE labels), both
  directions.
* ``ixi_cross``: the same pairs with the fixed T1 remapped by ``sin(0.9 pi x)``
  (grey matter brighter than white matter), the labels unchanged.

Held out: tcga_fg6692, IXI012 and IXI013 are outside the training of the shipped
DNS and KeyMorph weights (``configs/dns_brain.py``, ``configs/keymorph_brain.py``);
ms_mni patient19 is inside both (marked † in the table). The learned networks
(VoxelMorph, CAR, ContraReg, DeepSim) register only from a 3D checkpoint of a
training run; a row without one is left out with the command that trains it.
"""
import ml_collections

from configs import dns_brain, keymorph_brain

IXI = ("ixi/IXI012-HH-1211", "ixi/IXI013-HH-1212")
DNS_TRAINED = dns_brain.TRAIN_CASES
KEYMORPH_TRAINED = tuple(f"ixi/{c}" for c in keymorph_brain.LABELLED) + keymorph_brain.MULTI


def _train(config, workdir):
    return f".venv/bin/python -m train.main --config configs/{config}.py --workdir {workdir}"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.title = "every method on the same real brain pairs (2 mm)"
    c.resolution = 2.0        # the prepared pairs' grid (mm); the methods run on their default working grid
    c.deform_mm = 2.5         # mean |disp| of the known deformations (as benchmarks/io_registration.py)
    c.control_spacing = 16
    c.seed = 0
    c.method_resolution = None  # None: each method's default (2 mm for every brain here)
    c.pair_sets = (
        dict(name="brats_known", kind="known_deformation", title="glioma T2/FLAIR/T1c -> T1, known deformation",
             case="brats_space/tcga_fg6692", fixed="t1", moving=("t2", "flair", "t1c"),
             labels="tumor_seg.nii.gz", label_values=(1, 2, 4), seed=0),
        dict(name="ms_known", kind="known_deformation", title="MS T2/FLAIR -> T1, known deformation",
             case="ms_mni/patient19", fixed="t1", moving=("t2", "flair"), labels="lesion.nii.gz",
             label_values=(1,), seed=10),
        dict(name="ixi_mono", kind="inter_subject", title="IXI T1 -> T1, inter-subject, 148 labels",
             subjects=IXI, remap_fixed=False),
        dict(name="ixi_cross", kind="inter_subject",
             title="IXI T1 -> sin-remapped T1, inter-subject, 148 labels", subjects=IXI, remap_fixed=True),
    )
    c.methods = (
        dict(name="headers (no registration)", method="identity"),
        dict(name="ANTs SyN (Mattes MI)", method="ants"),
        dict(name="io-mind", method="io-mind"),
        dict(name="io-mi", method="io-mi"),
        dict(name="io-nmi", method="io-nmi"),
        dict(name="io-ngf", method="io-ngf"),
        dict(name="io-lncc", method="io-lncc"),
        dict(name="io-dns", method="io-dns", trained_on=DNS_TRAINED),
        dict(name="io-dns-random", method="io-dns-random"),
        dict(name="KeyMorph affine", method="keymorph", transform="affine", trained_on=KEYMORPH_TRAINED),
        dict(name="KeyMorph TPS (lambda 1)", method="keymorph", transform="tps", tps_lambda=1.0,
             trained_on=KEYMORPH_TRAINED),
        dict(name="io-mind --init keymorph", method="io-mind", init="keymorph", trained_on=KEYMORPH_TRAINED),
        dict(name="VoxelMorph (3D, MIND)", method="vxm", checkpoint="runs/vxm_ixi",
             train=_train("vxm_ixi", "runs/vxm_ixi")),
        dict(name="CAR (3D)", method="car", checkpoint="runs/car_brain3d",
             train=_train("car_brain3d", "runs/car_brain3d")),
        dict(name="ContraReg mCR (3D)", method="contrareg", checkpoint="runs/contrareg_brain3d", lam=0.1,
             train=_train("contrareg_brain3d", "runs/contrareg_brain3d")),
        dict(name="DeepSim-AE (3D)", method="deepsim", checkpoint="runs/deepsim_brain3d",
             train=_train("deepsim_brain3d", "runs/deepsim_brain3d")),
    )
    if arg == "quick":  # one pair per set, four methods: a smoke run
        c.pair_sets = tuple({**s, "moving": s["moving"][:1]} if "moving" in s else {**s, "max_pairs": 1}
                            for s in c.pair_sets)
        c.methods = tuple(m for m in c.methods if m["method"] in ("identity", "io-mind", "keymorph", "ants")
                          and m.get("transform", "affine") == "affine" and m.get("init") is None)
    elif arg:
        raise ValueError(f"configs/compare_brain.py: unknown argument {arg!r} (quick)")
    return c
