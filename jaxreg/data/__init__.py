"""Training data: manifests (CSV) and deterministic grain pipelines of registration pairs and of co-registered views (DNS)."""
from jaxreg.data.manifest import Subject, read_manifest, write_manifest
from jaxreg.data.pipeline import (MODES, PairSource, SubjectData, fixed_pairs, load_subjects, make_dataset,
                                  normalize, padded_grid, random_remap, random_smooth_disp, sin_remap, warp_numpy)
from jaxreg.data.views import ViewSource, ViewSubject, load_view_subject, shared_data_subjects

__all__ = ["MODES", "PairSource", "Subject", "SubjectData", "ViewSource", "ViewSubject", "load_view_subject",
           "shared_data_subjects", "fixed_pairs", "load_subjects", "make_dataset",
           "normalize", "padded_grid", "random_remap", "random_smooth_disp", "read_manifest", "sin_remap",
           "warp_numpy", "write_manifest"]
