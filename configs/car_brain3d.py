"""CAR in 3D (an extension: the paper is 2D and names 3D as future work), 4 mm, trained on T1 only.

Command (from the repository root)::

    PYTHONPATH=. JAXREG_DATA=../shared/data .venv/bin/python -m train.main \\
        --config configs/car_brain3d.py --workdir runs/car3d

Same data split, losses and options as ``configs/car_brain2d.py`` (see its
docstring), on whole volumes at 4 mm (MNI152 grid, cropped to 48x64x48):
training pairs are inter-subject T1 volumes with a random smooth deformation
of each (mean 1 voxel = 4 mm, control points 8 voxels apart) and random
flips; validation = one known deformation per held-out case and contrast,
and IXI 012 <-> 013 whole volumes (148 labels). A trained run registers NIfTI
scans with ``jaxreg register --method car --checkpoint runs/car3d`` (inputs
skull-stripped, as the training data).

Runtime and result on 2 CPU cores (2026-12-01): 600 steps in 935 s wall with data loading and
validation (partly shared with a benchmark). NOT learned yet: ``benchmarks/results/car_contrasts3d.md``
(one known deformation per held-out case and contrast) gives a mean endpoint error of 4.49 mm on T1 -> T1
and 4.57 mm on the unseen contrasts, worse than no registration (3.86 / 3.81 mm); io-mind 1.87 / 2.42 mm.
End to end, ``jaxreg register --method car --checkpoint runs/car3d`` on the real ixi_t2 IXI002 T2 -> T1
pair: brain-mask Dice 0.976 (headers) -> 0.981, 0 % folding, 39 s wall with a cold compilation cache
(io-mind: 0.989, 74 s).
"""
import ml_collections

from configs import car_brain2d


def get_config() -> ml_collections.ConfigDict:
    c = car_brain2d.get_config()
    c.num_train_steps = 600
    c.batch_size = 1
    c.eval_every = 300
    c.checkpoint_every = 100
    c.model.ndim = 3
    c.data.resolution = 4.0
    c.data.crop = (48, 64, 48)
    c.data.slice_axis = -1
    c.data.deform_voxels = 1.0
    c.data.deform_spacing = 8
    c.data.num_val = 1
    return c
