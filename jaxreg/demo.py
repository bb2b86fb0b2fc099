"""``jaxreg demo``: the main job on an embedded default that needs no user data.

The ICBM152 2009 T1 template that ``pip install nilearn`` ships (2 mm) is the
fixed scan. A second contrast is made from its tissue probability maps
(T2-like: CSF bright, grey matter mid, white matter dark), deformed by a
seeded random smooth diffeomorphism (known ground truth), written as NIfTI,
and registered back with ``jaxreg register`` (io-mind, SVF). The demo prints
the endpoint error in mm inside the brain and the grey/white-matter Dice
before and after.
"""
import json
import pathlib
import sys
import tempfile

import numpy as np


def _templates():
    try:
        from nilearn import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("the demo needs nilearn: pip install 'jaxreg[examples]'") from e
    t1 = datasets.load_mni152_template(resolution=2)
    gm = datasets.load_mni152_gm_template(resolution=2)
    wm = datasets.load_mni152_wm_template(resolution=2)
    mask = datasets.load_mni152_brain_mask(resolution=2)
    get = lambda img: np.asarray(img.get_fdata(), np.float32)  # noqa: E731
    return get(t1), get(gm), get(wm), get(mask) > 0.5, np.asarray(t1.affine, np.float64)


def make_demo_inputs(directory: pathlib.Path, *, seed: int = 0, mean_magnitude_mm: float = 2.5):
    """Write the demo's fixed/moving scans and labels; return the ground truth.

    Returns:
      dict with paths, ``disp_true`` ``(*shape, 3)`` (fixed voxels, whole map
      fixed -> moving), the brain mask and the voxel spacing (mm).
    """
    import jax
    import jax.numpy as jnp

    from jaxreg.augment import random_deformation
    from jaxreg.io import save_image
    from jaxreg.spatial import warp, warp_labels

    t1, gm, wm, brain, affine = _templates()
    spacing = float(np.linalg.norm(affine[:3, 0]))
    csf = np.clip(brain.astype(np.float32) - gm - wm, 0, 1)
    rng = np.random.default_rng(seed)
    t2 = (1.0 * csf + 0.55 * gm + 0.25 * wm) * brain + rng.normal(0, 0.01, t1.shape).astype(np.float32) * brain
    labels = np.zeros(t1.shape, np.int32)
    labels[(gm > 0.5) & (gm >= wm)] = 1
    labels[(wm > 0.5) & (wm > gm)] = 2
    disp_true, inv_true = random_deformation(jax.random.key(seed), t1.shape,
                                             mean_magnitude=mean_magnitude_mm / spacing, control_spacing=16)
    # moving(x + disp_true(x)) = t2(x): the registration should recover disp_true.
    moving = np.asarray(warp(jnp.asarray(t2), inv_true))
    moving_labels = np.asarray(warp_labels(jnp.asarray(labels), inv_true))
    paths = {k: directory / f"{k}.nii.gz" for k in ("fixed", "moving", "fixed_labels", "moving_labels")}
    save_image(paths["fixed"], t1, affine)
    save_image(paths["moving"], moving.astype(np.float32), affine)
    save_image(paths["fixed_labels"], labels, affine)
    save_image(paths["moving_labels"], moving_labels.astype(np.int32), affine)
    return {"paths": paths, "disp_true": np.asarray(disp_true), "brain": brain, "spacing": spacing}


def run_demo(out="demo_out", *, overwrite: bool = False, seed: int = 0) -> dict:
    """Run the demo; writes the ``jaxreg register`` outputs and ``demo.json`` to ``out``.

    It runs the library as ``jaxreg register --method io-mind`` does (``pipeline.register_volumes``,
    ``pipeline.registration_metrics``, ``outputs.write_registration``) and scores the written warp.

    Raises:
      FileExistsError: ``out`` holds demo outputs and ``overwrite`` is False.
    """
    from jaxreg import pipeline
    from jaxreg.io import load_image, load_itk_warp, load_labels, world_warp_to_voxel_disp
    from jaxreg.outputs import REGISTER_OUTPUTS, check_out_dir, write_registration

    out = pathlib.Path(out)
    check_out_dir(out, REGISTER_OUTPUTS + ("demo.json",), overwrite)
    with tempfile.TemporaryDirectory(prefix="jaxreg-demo-") as tmp:
        tmp = pathlib.Path(tmp)
        truth = make_demo_inputs(tmp, seed=seed)
        p = truth["paths"]
        fixed, moving = load_image(p["fixed"]), load_image(p["moving"])
        fixed_labels, moving_labels = load_labels(p["fixed_labels"]), load_labels(p["moving_labels"])
        config = pipeline.config_for("io-mind")
        print(f"jaxreg demo: registering {p['moving'].name} to {p['fixed'].name} (io-mind, svf, 2 mm)",
              file=sys.stderr)
        reg = pipeline.register_volumes(fixed, moving, config=config, resolution=2.0, metrics=True,
                                        progress=lambda msg: print(msg, file=sys.stderr))
        warped_labels = pipeline.warp_labels_to_fixed(moving_labels, fixed, reg)
        metrics = pipeline.registration_metrics("io-mind", config, reg, fixed, fixed_labels, warped_labels,
                                                pipeline.warp_labels_to_fixed(moving_labels, fixed, None))
        write_registration(out, fixed=fixed, reg=reg, metrics=metrics, warped_labels=warped_labels,
                           title="io-mind (svf)")
        # Read the transform back from the written ITK warp: this checks the file, not just memory.
        d_lps, warp_affine = load_itk_warp(out / "warp.nii.gz")
        disp = world_warp_to_voxel_disp(d_lps, warp_affine, fixed.affine)
    brain, sp = truth["brain"], truth["spacing"]
    before = np.linalg.norm(truth["disp_true"], axis=-1)[brain] * sp
    after = np.linalg.norm(disp - truth["disp_true"], axis=-1)[brain] * sp
    summary = {
        "endpoint_error_mm_before": {"mean": float(before.mean()), "p95": float(np.percentile(before, 95))},
        "endpoint_error_mm_after": {"mean": float(after.mean()), "p95": float(np.percentile(after, 95))},
        "dice_before": metrics.get("dice_mean_before"),
        "dice_after": metrics.get("dice_mean"),
        "dice_gm_wm_after": metrics.get("dice"),
        "folding_percent": metrics["folding_percent"],
        "runtime_s": metrics["runtime_s"],
    }
    with open(out / "demo.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(f"jaxreg demo: endpoint error in the brain {before.mean():.2f} mm -> {after.mean():.2f} mm "
          f"(p95 {np.percentile(before, 95):.2f} -> {np.percentile(after, 95):.2f}); "
          f"GM/WM Dice {summary['dice_before']:.3f} -> {summary['dice_after']:.3f}; "
          f"folding {summary['folding_percent']:.3f} %; optimisation {summary['runtime_s']:.1f} s; outputs in {out}",
          file=sys.stdout)
    return summary
