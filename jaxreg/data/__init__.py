"""Training data: manifests (CSV) and deterministic grain pipelines of registration pairs."""
from jaxreg.data.manifest import Subject, read_manifest, write_manifest
from jaxreg.data.pipeline import (MODES, PairSource, SubjectData, fixed_pairs, load_subjects, make_dataset,
                                  normalize, padded_grid, random_remap, random_smooth_disp, sin_remap, warp_numpy)

__all__ = ["MODES", "PairSource", "Subject", "SubjectData", "fixed_pairs", "load_subjects", "make_dataset",
           "normalize", "padded_grid", "random_remap", "random_smooth_disp", "read_manifest", "sin_remap",
           "warp_numpy", "write_manifest"]
