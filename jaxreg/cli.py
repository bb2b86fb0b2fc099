"""``jaxreg`` console script: register, apply, evaluate, demo.

Every command validates its inputs before any work, exits non-zero with a
one-line message on bad input, never leaves partial outputs (files are
written to a temporary folder beside the output and moved into place at the
end) and refuses to overwrite existing outputs without ``--overwrite``.
"""
import argparse
import gc
import json
import os
import pathlib
import sys

import numpy as np

from jaxreg.outputs import KEYPOINT_OUTPUTS, REGISTER_OUTPUTS, atomic_dir, check_out_dir, write_registration

EXIT_USAGE = 2
EXIT_INPUT = 3


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code ``code``."""

    def __init__(self, msg, code=EXIT_INPUT):
        super().__init__(msg)
        self.code = code


METHOD_CHOICES = ["io-mind", "io-dns", "io-dns-random", "io-deepsim", "io-mi", "io-nmi", "io-ngf", "io-lncc", "io-mse",
                  "vxm", "car", "contrareg", "deepsim", "keymorph"]
EVALUATE_OUTPUTS = ("per_pair.csv", "summary.json", "summary.md", "sweep.png")
COMPARE_OUTPUTS = ("results.md", "results.json", "per_pair.csv")


def _parse_levels(text):
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"iterations must be positive, got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxreg", description="Multi-modal deformable image registration in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("register", help="register a moving scan to a fixed scan")
    r.add_argument("--fixed", required=True, help="fixed NIfTI (defines the output grid)")
    r.add_argument("--moving", required=True, nargs="+",
                   help="moving NIfTI (any grid/orientation); several: a cohort registered in one process "
                        "(start-up and compilation paid once), each into --out/<moving file name>/")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--devices", default="auto",
                   help="with several --moving scans: how many local devices (GPUs, TPU cores) register pairs "
                        "at once, one pair per device, each with exactly the single-device result; 'auto' "
                        "(default) = all local devices of the default backend (one on a plain CPU host)")
    r.add_argument("--method", default="io-mind", choices=METHOD_CHOICES,
                   help="io-*: instance optimisation with that similarity (default io-mind; io-dns: learned "
                        "DNS descriptors, weights shipped; io-dns-random: the same network untrained; io-deepsim: "
                        "DeepSim features of a pretrained extractor, --checkpoint); "
                        "vxm: a trained VoxelMorph-style network (--checkpoint); car: a trained contrast-agnostic "
                        "CAR network (--checkpoint, 3D, skull-stripped scans); keymorph: learned keypoints "
                        "aligned in closed form (--transform affine|rigid|tps, weights shipped)")
    r.add_argument("--weights", help="io-dns / keymorph: network weights (.safetensors with its .json beside it; "
                                     "default: the shipped brain weights)")
    r.add_argument("--checkpoint", help="training run directory (train.main --workdir) for --method vxm, car, contrareg "
                                        "or deepsim; for io-deepsim a DeepSim extractor run (configs/deepsim_features_*.py), "
                                        "registered by default at the grid spacing it was trained on")
    r.add_argument("--lambda", dest="lam", type=float, default=None,
                   help="regularisation weight in [0, 1] for a lambda-conditioned network")
    r.add_argument("--transform", default=None, choices=["svf", "disp", "affine", "rigid", "tps"],
                   help="transform model (default svf: diffeomorphic; keymorph: affine (default), rigid or tps)")
    r.add_argument("--tps-lambda", dest="tps_lambda", default=None,
                   help="keymorph --transform tps: the TPS regulariser lambda >= 0 (default 0: the keypoints "
                        "are matched exactly; large: tends to the affine)")
    r.add_argument("--no-affine", action="store_true", help="skip the affine pre-alignment")
    r.add_argument("--init", default="auto", choices=["auto", "header", "com", "keymorph"],
                   help="start of the affine/rigid stage: header (the scans' NIfTI affines), com (centre-of-mass "
                        "translation), auto (default: refine both, and the 4 rotations that align the two heads' "
                        "principal axes, at the coarsest level and keep the best fit: a head rotated by any angle "
                        "registers) or keymorph (the shipped KeyMorph rigid fit as one more start of auto)")
    r.add_argument("--levels", type=int, default=None, help="pyramid levels (default 3)")
    r.add_argument("--iterations", type=_parse_levels, default=None,
                   help="Adam steps per level, coarse to fine, e.g. 100,80,50")
    r.add_argument("--resolution", type=float, default=None,
                   help="working-grid spacing in mm; 0 = the fixed grid. Default: the coarsest grid with 80 "
                        "voxels across the median extent of the fixed field of view, at most 2 mm and never finer "
                        "than the fixed scan (brains: 2 mm; a 4x8x8 cm spinal-cord field of view: 1 mm); half "
                        "that (brains: 1 mm) for --transform rigid/affine; vxm and car: the network's training "
                        "resolution")
    r.add_argument("--fixed-labels", help="fixed label map (integer NIfTI) for Dice/HD95")
    r.add_argument("--moving-labels", nargs="+", help="moving label map, warped with the moving scan (one per "
                                                        "--moving scan)")
    r.add_argument("--qc", action="store_true",
                   help="also draw qc.png (overlays, deformed grid, Jacobian determinant; ~0.7 s on 2 cores)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (the folder's own outputs of an earlier run that this run does "
                        "not write, such as qc.png without --qc, are removed)")
    r.add_argument("--quiet", action="store_true", help="no progress output")

    a = sub.add_parser("apply", help="apply a saved warp (ITK/ANTs displacement, mm) to an image")
    a.add_argument("--transform", required=True, help="warp.nii.gz from `jaxreg register` (or ANTs)")
    a.add_argument("--image", required=True, help="image to resample")
    a.add_argument("--reference", required=True, help="image defining the output grid (the fixed scan)")
    a.add_argument("--out", required=True, help="output NIfTI path")
    a.add_argument("--labels", action="store_true", help="integer labels: nearest-neighbour")
    a.add_argument("--overwrite", action="store_true")

    e = sub.add_parser("evaluate", help="register every pair of a CSV and write per-pair and summary metrics")
    e.add_argument("--pairs", required=True,
                   help="CSV with columns fixed, moving [, fixed_labels, moving_labels, name]")
    e.add_argument("--method", default="io-mind", choices=METHOD_CHOICES)
    e.add_argument("--checkpoint", help="training run directory for --method vxm, car, contrareg or deepsim; a DeepSim "
                                        "extractor run for io-deepsim")
    e.add_argument("--weights", help="io-dns: MASR-Net weights (default: shipped)")
    e.add_argument("--lambda", dest="lam", type=float, default=None)
    e.add_argument("--lambdas", default=None,
                   help="lambda sweep of a lambda-conditioned network: 'sweep' (17 values, dense in [0, 0.2), "
                        "sparse in [0.2, 1], as ContraReg) or comma-separated values; tables every lambda, the "
                        "one with folding < 0.5 %% and the best Dice, and plots them (sweep.png)")
    e.add_argument("--resolution", type=float, default=None,
                   help="working-grid spacing in mm (default as for register)")
    e.add_argument("--out", required=True, help="output directory (per_pair.csv, summary.json, summary.md)")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--quiet", action="store_true")

    c = sub.add_parser("compare", help="run several methods on the same real pairs and write one table (results.md)")
    c.add_argument("--config", required=True, help="comparison config, e.g. configs/compare_brain.py "
                                                     "(PATH[:ARG] passes ARG to get_config, e.g. :quick)")
    c.add_argument("--out", required=True, help="output directory (results.md, results.json, per_pair.csv)")
    c.add_argument("--methods", default=None, help="comma-separated method names of the config to run (default all)")
    c.add_argument("--sets", default=None, help="comma-separated pair-set names of the config (default all)")
    c.add_argument("--data", default=None, help="data folder (default $JAXREG_DATA or ../shared/data)")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--update", action="store_true",
                   help="rerun only --methods/--sets and merge them into the results already in --out (the other "
                        "rows are kept; the run is recorded in results.md)")
    c.add_argument("--quiet", action="store_true")

    d = sub.add_parser("demo", help="register a synthetic second contrast of the ICBM152 template back")
    d.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    d.add_argument("--overwrite", action="store_true")
    d.add_argument("--seed", type=int, default=0)
    return p


def _check_out_dir(out: pathlib.Path, names, overwrite: bool):
    try:
        check_out_dir(out, names, overwrite)
    except (NotADirectoryError, FileExistsError) as e:
        raise CLIError(str(e)) from None


def _progress(quiet):
    if quiet:
        return lambda msg: None
    from tqdm import tqdm

    return lambda msg: tqdm.write(msg, file=sys.stderr)


def _load_scan(flag, path, labels_path=None):
    """A 3D scan and its optional label map (same grid), with ``--fixed`` / ``--moving`` in the errors."""
    from jaxreg.io import load_image, load_labels

    scan = load_image(path)
    name = flag if flag == "--fixed" else f"{flag} {path}"
    if scan.data.ndim != 3:
        raise CLIError(f"{name} must be a 3D scan, got shape {scan.data.shape}")
    labels = None
    if labels_path:
        labels = load_labels(labels_path)
        if labels.data.shape != scan.data.shape:
            raise CLIError(f"{flag}-labels shape {labels.data.shape} differs from {name} {scan.data.shape}")
    return scan, labels


def _nifti_stem(path) -> str:
    name = pathlib.Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _register_plan(args):
    """``[(moving, moving_labels or None, out folder)]``, validated before any work: one moving scan writes into
    ``--out``, several write into ``--out/<moving file stem>/`` (stems must differ)."""
    movings, labels = args.moving, args.moving_labels or []
    if labels and len(labels) != len(movings):
        raise CLIError(f"--moving-labels needs one label map per --moving scan ({len(movings)}), got {len(labels)}",
                       EXIT_USAGE)
    for path in [args.fixed, *movings, *labels] + ([args.fixed_labels] if args.fixed_labels else []):
        if not pathlib.Path(path).is_file():
            raise CLIError(f"{path} does not exist")
    out = pathlib.Path(args.out)
    if len(movings) == 1:
        outs = [out]
    else:
        stems = [_nifti_stem(m) for m in movings]
        dupes = sorted({x for x in stems if stems.count(x) > 1})
        if dupes:
            raise CLIError(f"several --moving scans share the name {', '.join(dupes)}: their output folders "
                           f"(--out/<name>) would clash", EXIT_USAGE)
        outs = [out / stem for stem in stems]
    names = REGISTER_OUTPUTS + (KEYPOINT_OUTPUTS if args.method == "keymorph" else ())
    for o in outs:
        _check_out_dir(o, names, args.overwrite)
    return [(m, labels[i] if labels else None, o) for i, (m, o) in enumerate(zip(movings, outs))]


def run_register(args):
    """Implementation of ``jaxreg register``: the metrics dict (one moving scan) or a list of them (several).

    Several ``--moving`` scans share one process, so start-up, the fixed scan and the compiled programs
    (for working grids of one size class) are paid once. Every pair keeps the single-pair guarantees: a
    pair that fails writes nothing and the others still run; the command then exits non-zero.
    """
    plan = _register_plan(args)
    if _OWN_PROCESS:
        from jaxreg import programs

        if programs.manifest_stored(_job_tag(args, plan[0][0])):  # before JAX starts its threads
            _tune_malloc()
    if args.qc:
        _preload_output_modules()
    devices = _cohort_devices(getattr(args, "devices", "auto"), len(plan))
    fixed, fixed_labels = _load_scan("--fixed", args.fixed, args.fixed_labels)
    report = _progress(args.quiet)
    runner, config, feature_fn = _registration_runner(args, report)
    if len(plan) == 1:
        return _register_pair(args, runner, config, feature_fn, fixed, fixed_labels, *plan[0], report)

    def one(k):
        moving_path, labels_path, out = plan[k]
        report(f"pair {k + 1}/{len(plan)}: {moving_path}")
        try:
            return _register_pair(args, runner, config, feature_fn, fixed, fixed_labels, moving_path, labels_path,
                                  out, report)
        except (CLIError, ValueError, OSError) as e:
            print(f"jaxreg register: error: {moving_path}: {e} (nothing written to {out})", file=sys.stderr)
            return None
        finally:
            if not gc.isenabled():  # the console script's process (entry): bound the garbage of a long cohort
                gc.collect()

    if len(devices) == 1:
        outcome = [one(k) for k in range(len(plan))]
    else:
        outcome = _on_devices(one, len(plan), devices)
    results = [r for r in outcome if r is not None]
    failed = [str(plan[k][0]) for k, r in enumerate(outcome) if r is None]
    if failed:
        raise CLIError(f"{len(failed)} of {len(plan)} pairs failed ({', '.join(failed)}); the other "
                       f"{len(plan) - len(failed)} were written")
    return results


def _preload_output_modules() -> None:
    """Import the QC figure's module (matplotlib: ~0.5 s) in a thread.

    The import overlaps the registration, which runs in XLA with the GIL released, instead of delaying the
    outputs (issue 18). Python's import lock makes a later import in the main thread wait for this one.
    """
    import threading

    def load():
        import jaxreg.viz  # noqa: F401

    threading.Thread(target=load, daemon=True).start()


def _cohort_devices(spec, n_pairs: int) -> list:
    """The local devices a cohort of ``n_pairs`` runs on (``--devices``: 'auto' or a count), validated before any
    work: at most one per pair, at least one."""
    import jax

    local = jax.local_devices()
    if spec in (None, "auto"):
        n = len(local)
    else:
        try:
            n = int(spec)
        except ValueError:
            raise CLIError(f"--devices must be 'auto' or a positive integer, got {spec!r}", EXIT_USAGE) from None
        if n < 1 or n > len(local):
            raise CLIError(f"--devices {n}: this host has {len(local)} local {jax.default_backend()} device(s)",
                           EXIT_USAGE)
    return local[:max(1, min(n, n_pairs))]


def _on_devices(fn, n_items: int, devices) -> list:
    """``[fn(k) for k in range(n_items)]`` with item ``k`` on ``devices[k % len(devices)]``, one thread per device.

    Each thread makes its device JAX's default (``jax.default_device``, thread-local), so every array and
    jitted program of a pair lives there: the pair's result is the single-device result. The programs run as
    plain ``jax.jit`` in those threads (:func:`jaxreg.programs.plain_jit`): the store of compiled executables
    serves the single-device path.
    """
    import concurrent.futures

    import jax

    from jaxreg import programs

    def worker(i):
        out = {}
        with jax.default_device(devices[i]), programs.plain_jit():
            for k in range(i, n_items, len(devices)):
                out[k] = fn(k)
        return out

    with concurrent.futures.ThreadPoolExecutor(len(devices)) as pool:
        parts = list(pool.map(worker, range(len(devices))))
    merged = {k: v for part in parts for k, v in part.items()}
    return [merged[k] for k in range(n_items)]


def _current_device() -> str:
    from jaxreg.programs import default_device

    dev = default_device()
    return f"{dev.platform}:{dev.id}"


def _job_tag(args, moving_path) -> str:
    """What decides the programs of one pair (options, grids): the key of its :func:`programs.manifest`."""
    import nibabel as nib

    def grid(path):  # the header only, so the executables load while _load_scan reads the data
        try:
            img = nib.load(str(path))
            return tuple(img.shape), np.round(img.affine, 3).tolist()
        except Exception:  # noqa: BLE001 - _load_scan reports it
            return None

    options = {k: v for k, v in sorted(vars(args).items())
               if k not in ("fixed", "moving", "out", "fixed_labels", "moving_labels", "overwrite", "quiet")}
    return repr(("register", options, grid(args.fixed), grid(moving_path), args.fixed_labels is not None,
                 args.moving_labels is not None))


def _register_pair(args, runner, config, feature_fn, fixed, fixed_labels, moving_path, labels_path, out, report):
    from jaxreg import programs

    with programs.manifest(_job_tag(args, moving_path)):
        return _register_pair_body(args, runner, config, feature_fn, fixed, fixed_labels, moving_path, labels_path,
                                   out, report)


def _register_pair_body(args, runner, config, feature_fn, fixed, fixed_labels, moving_path, labels_path, out,
                        report):
    from jaxreg import pipeline

    moving, moving_labels = _load_scan("--moving", moving_path, labels_path)
    report(f"jaxreg register: {args.method}, {getattr(runner, 'transform', config.transform)}, "
           f"fixed {fixed.data.shape}, moving {moving.data.shape}")
    label_job = pipeline.start_label_metrics(fixed, fixed_labels, moving_labels)
    reg = runner(fixed, moving)
    keypoints = getattr(runner, "keypoints", None)
    warped_labels = None
    if moving_labels is not None:
        warped_labels = pipeline.warp_labels_to_fixed(moving_labels, fixed, reg)
    prepared = {} if label_job is None else label_job.result()
    device = _current_device()
    transform = getattr(runner, "transform", config.transform)

    def metrics_fn():  # computed while the NIfTI outputs compress (write_registration)
        return {**pipeline.registration_metrics(args.method, config, reg, fixed, fixed_labels, warped_labels,
                                                prepared.get("moving_labels_on_fixed"), feature_fn=feature_fn,
                                                fixed_surfaces=prepared.get("fixed_surfaces")), "device": device}

    metrics = write_registration(out, fixed=fixed, reg=reg, metrics=metrics_fn, warped_labels=warped_labels,
                                 keypoints=keypoints, qc=args.qc, title=f"{args.method} ({transform})")
    report(f"wrote {out}: runtime {metrics['runtime_s']:.1f} s, folding {metrics['folding_percent']:.3f} %"
           + (f", Dice {metrics['dice_mean']:.3f}" if "dice_mean" in metrics else ""))
    return metrics


def _load_keymorph(weights):
    from jaxreg import pipeline

    try:
        return pipeline.load_keymorph(weights)
    except FileNotFoundError as e:
        raise CLIError(f"--weights: {e}" if weights else f"the shipped KeyMorph weights are missing: {e}") from None
    except ValueError as e:
        raise CLIError(f"--weights {weights}: {e}" if weights else str(e)) from None


def _keymorph_runner(args, report):
    from jaxreg import pipeline
    from jaxreg.methods.keymorph import check_lambda
    from jaxreg.optimize import InstanceConfig

    transform = getattr(args, "transform", None) or "affine"
    if transform not in ("affine", "rigid", "tps"):
        raise CLIError(f"--method keymorph takes --transform affine, rigid or tps, not {transform}", EXIT_USAGE)
    lam = 0.0
    if getattr(args, "tps_lambda", None) is not None:
        if transform != "tps":
            raise CLIError("--tps-lambda is only used with --transform tps", EXIT_USAGE)
        try:
            lam = check_lambda(args.tps_lambda)
        except ValueError as e:
            raise CLIError(f"--tps-lambda: {e}", EXIT_USAGE) from None
    for flag, name in (("checkpoint", "--checkpoint"), ("lam", "--lambda"), ("levels", "--levels"),
                       ("iterations", "--iterations")):
        if getattr(args, flag, None) is not None:
            raise CLIError(f"{name} is not used by --method keymorph", EXIT_USAGE)
    if getattr(args, "init", "auto") not in (None, "auto"):
        raise CLIError("--init is for the io-* methods (--init keymorph: KeyMorph's rigid fit starts their affine "
                       "stage); --method keymorph needs none", EXIT_USAGE)
    model = _load_keymorph(getattr(args, "weights", None))
    resolution = getattr(args, "resolution", None)
    res = "auto" if resolution is None else (resolution or None)

    def run(f, m):
        reg, pts = pipeline.register_volumes_keymorph(f, m, model=model, transform=transform, tps_lambda=lam,
                                                      resolution=res, progress=report)
        run.keypoints = pts
        return reg

    run.keypoints, run.transform = None, transform if transform != "tps" else f"tps, lambda {lam:g}"
    config = InstanceConfig(similarity="mi", transform=transform if transform != "tps" else "disp")
    return run, config, None


def _registration_runner(args, report):
    """``(run(fixed, moving) -> Registration, config, feature_fn)`` for ``args.method`` (validated before any work).

    ``run.keypoints`` holds KeyMorph's keypoints after a ``--method keymorph`` run.
    """
    from jaxreg import pipeline

    resolution = getattr(args, "resolution", None)
    if args.method == "keymorph":
        return _keymorph_runner(args, report)
    if getattr(args, "transform", None) == "tps":
        raise CLIError("--transform tps is only for --method keymorph", EXIT_USAGE)
    if getattr(args, "tps_lambda", None) is not None:
        raise CLIError("--tps-lambda is only used with --method keymorph --transform tps", EXIT_USAGE)
    init = getattr(args, "init", None) or "auto"
    learned = {"vxm": "voxelmorph", "car": "car", "contrareg": "contrareg", "deepsim": "deepsim"}
    if args.method in learned and init != "auto":
        raise CLIError("--init is for the io-* methods", EXIT_USAGE)
    if args.method in learned:
        if not args.checkpoint:
            raise CLIError(f"--method {args.method} needs --checkpoint DIR (a training run directory)", EXIT_USAGE)
        from jaxreg.io.checkpoint import load_trained, run_resolution
        from jaxreg.methods import restore_model
        from jaxreg.optimize import InstanceConfig

        run_cfg, params, step = load_trained(args.checkpoint)
        if run_cfg.get("method") != learned[args.method]:
            raise CLIError(f"--checkpoint {args.checkpoint} holds a {run_cfg.get('method')!r} network, not "
                           f"{learned[args.method]!r} (--method {args.method})", EXIT_USAGE)
        if int(run_cfg.get("model", {}).get("ndim", 3)) != 3:
            raise CLIError(f"--checkpoint {args.checkpoint} holds a {run_cfg['model']['ndim']}D network; "
                           f"registering NIfTI volumes needs a 3D one (e.g. configs/car_brain3d.py)", EXIT_USAGE)
        module, model = restore_model(run_cfg, params)
        if model.config.hyper and args.lam is None:
            raise CLIError("this network is lambda-conditioned: pass --lambda in [0, 1]", EXIT_USAGE)
        if not model.config.hyper and args.lam is not None:
            raise CLIError("--lambda given but the network is not lambda-conditioned", EXIT_USAGE)
        if args.lam is not None and not 0.0 <= args.lam <= 1.0:
            raise CLIError(f"--lambda must be in [0, 1], got {args.lam}", EXIT_USAGE)
        train_res = run_resolution(run_cfg)
        if resolution is not None and resolution != train_res:
            report(f"note: the network was trained at {train_res} mm; registering at {resolution or 'native'} mm")
        res = train_res if resolution is None else (resolution or None)
        report(f"loaded {run_cfg.get('method')} from {args.checkpoint} (step {step})")
        from jaxreg.optimize.instance import SIMILARITIES

        # learned similarities (ContraReg's PatchNCE, DeepSim) need the network's extractors: report MIND-SSC
        sim = model.config.similarity
        config = InstanceConfig(similarity=sim if sim in SIMILARITIES else "mind")
        return (lambda f, m: pipeline.register_volumes_learned(f, m, module=module, model=model, lam=args.lam,
                                                               resolution=res, progress=report)), config, None
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint and args.method != "io-deepsim":
        raise CLIError("--checkpoint is only used with --method vxm, car, contrareg, deepsim or io-deepsim", EXIT_USAGE)
    if args.method == "io-deepsim" and not checkpoint:
        raise CLIError("--method io-deepsim needs --checkpoint DIR (a DeepSim extractor run, "
                       "configs/deepsim_features_*.py)", EXIT_USAGE)
    weights = getattr(args, "weights", None)
    if weights is not None and args.method != "io-dns":
        raise CLIError(f"--weights is only used with --method io-dns or keymorph, not {args.method}", EXIT_USAGE)
    flag = "--checkpoint" if checkpoint else "--weights" if weights else None
    try:
        feature_fn = pipeline.feature_fn_for(args.method, weights, checkpoint=checkpoint)
    except FileNotFoundError as e:
        raise CLIError(f"{flag}: {e}") from None
    except ValueError as e:
        raise CLIError(f"{flag} {checkpoint or weights}: {e}" if flag else str(e)) from None
    if args.method == "io-deepsim" and resolution is None:  # the extractor's features belong to its training grid
        resolution = feature_fn.resolution_mm
        report(f"io-deepsim: registering at {resolution:g} mm, the grid its extractor was trained on")
    config = pipeline.config_for(args.method, transform=getattr(args, "transform", None) or "svf",
                                 affine=not getattr(args, "no_affine", False), levels=getattr(args, "levels", None),
                                 iterations=getattr(args, "iterations", None),
                                 affine_init="auto" if init == "keymorph" else init)
    res = "auto" if resolution is None else (resolution or None)
    keymorph = _load_keymorph(None) if init == "keymorph" else None

    def run(f, m):
        start = None
        if keymorph is not None:
            start = pipeline.keymorph_init(f, m, keymorph, progress=report)
        return pipeline.register_volumes(f, m, config=config, resolution=res, progress=report, metrics=True,
                                         feature_fn=feature_fn, init=start)

    return run, config, feature_fn


def _read_pairs(path):
    import csv

    path = pathlib.Path(path)
    if not path.is_file():
        raise CLIError(f"--pairs {path} does not exist")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"fixed", "moving"} <= set(rows[0]):
        raise CLIError(f"--pairs {path} needs a header with at least 'fixed' and 'moving' and one row")
    out = []
    for n, r in enumerate(rows, start=2):
        r = {k.strip(): (v or "").strip() for k, v in r.items() if k}
        for k in ("fixed", "moving", "fixed_labels", "moving_labels"):
            if r.get(k):
                q = pathlib.Path(r[k])
                q = q if q.is_absolute() else path.parent / q
                if not q.is_file():
                    raise CLIError(f"{path}:{n}: {k} {q} does not exist")
                r[k] = str(q)
        if not r.get("fixed") or not r.get("moving"):
            raise CLIError(f"{path}:{n}: empty fixed or moving")
        r["name"] = r.get("name") or f"{pathlib.Path(r['moving']).name}->{pathlib.Path(r['fixed']).name}"
        out.append(r)
    return out


SUMMARY_KEYS = ("dice_mean", "dice_mean_before", "dice30", "hd95_mm", "folding_percent", "sdlogj", "runtime_s")


def run_evaluate(args) -> dict:
    """Implementation of ``jaxreg evaluate``; returns the summary dict."""
    from jaxreg import sweep

    out = pathlib.Path(args.out)
    _check_out_dir(out, EVALUATE_OUTPUTS, args.overwrite)
    lambdas = None
    if getattr(args, "lambdas", None):
        if args.lam is not None:
            raise CLIError("pass --lambda or --lambdas, not both", EXIT_USAGE)
        try:
            lambdas = sweep.parse_lambdas(args.lambdas)
        except ValueError as e:
            raise CLIError(str(e), EXIT_USAGE) from None
        args.lam = lambdas[0]
    pairs = _read_pairs(args.pairs)
    report = _progress(args.quiet)
    runner, config, feature_fn = _registration_runner(args, report)
    per_lambda = _evaluate_pairs(args, pairs, runner, config, feature_fn, report, lambdas or (args.lam,))
    if lambdas is None:
        summary, rows = per_lambda[0]
        _write_evaluation(out, args, summary, rows, report)
        return summary
    sweep_rows = [{"lambda": lam, **{k: summ[f"{k}_mean"] for k in SUMMARY_KEYS}}
                  for lam, (summ, _) in zip(lambdas, per_lambda)]
    all_rows = [{"lambda": lam, **r} for lam, (_, rows) in zip(lambdas, per_lambda) for r in rows]
    chosen = sweep.select_lambda(sweep_rows, score="dice_mean")
    summary = {"method": args.method, "checkpoint": args.checkpoint, "pairs": len(pairs), "lambdas": list(lambdas),
               "sweep": sweep_rows, "selected": chosen,
               "selection": "best dice_mean among the lambdas with folding_percent < 0.5"}
    _write_evaluation(out, args, summary, all_rows, report, sweep_rows=sweep_rows)
    return summary


def _evaluate_pairs(args, pairs, runner, config, feature_fn, report, lambdas):
    """``[(summary, rows)]`` per lambda of ``lambdas`` (``args.lam``, read by the runner, is set to each in turn).

    Each pair is read once and registered at every lambda.
    """
    import numpy as np

    from jaxreg import pipeline

    rows = [[] for _ in lambdas]
    for k, p in enumerate(pairs):
        fixed, fixed_labels = _load_scan("--fixed", p["fixed"], p.get("fixed_labels") or None)
        moving, moving_labels = _load_scan("--moving", p["moving"], p.get("moving_labels") or None)
        before = None if moving_labels is None else pipeline.warp_labels_to_fixed(moving_labels, fixed, None)
        for j, lam in enumerate(lambdas):
            args.lam = lam
            reg = runner(fixed, moving)
            warped_labels = None if moving_labels is None else pipeline.warp_labels_to_fixed(moving_labels, fixed, reg)
            m = pipeline.registration_metrics(args.method, config, reg, fixed, fixed_labels, warped_labels, before,
                                              feature_fn=feature_fn)
            row = {"name": p["name"], **{key: m.get(key) for key in SUMMARY_KEYS}}
            rows[j].append(row)
            report(f"pair {k + 1}/{len(pairs)} {p['name']}" + (f" lambda {lam:g}" if lam is not None else "") + ": "
                   + ", ".join(f"{key} {v:.4g}" for key, v in row.items() if isinstance(v, float)))

    def summary(lam, rs):
        return {"method": args.method, "checkpoint": args.checkpoint, "lambda": lam, "pairs": len(rs),
                **{f"{key}_mean": (float(np.mean([r[key] for r in rs if r[key] is not None]))
                                   if any(r[key] is not None for r in rs) else None) for key in SUMMARY_KEYS}}

    return [(summary(lam, rs), rs) for lam, rs in zip(lambdas, rows)]


def _write_evaluation(out, args, summary, rows, report, *, sweep_rows=None):
    """per_pair.csv, summary.json, summary.md (and sweep.png for a lambda sweep), written all or nothing."""
    import csv
    import io

    from jaxreg import sweep

    lead = ["lambda", "name"] if sweep_rows is not None else ["name"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*lead, *SUMMARY_KEYS])
    w.writeheader()
    w.writerows(rows)
    fmt = lambda v: "–" if v is None else f"{v:.4g}"  # noqa: E731
    md = [f"# jaxreg evaluate: {args.method}" + (f" ({args.checkpoint})" if args.checkpoint else ""), ""]
    if sweep_rows is None:
        md += ["| pair | " + " | ".join(SUMMARY_KEYS) + " |", "|---" * (len(SUMMARY_KEYS) + 1) + "|"]
        md += [f"| {r['name']} | " + " | ".join(fmt(r[k]) for k in SUMMARY_KEYS) + " |" for r in rows]
        md.append("| **mean** | " + " | ".join(fmt(summary[f"{k}_mean"]) for k in SUMMARY_KEYS) + " |")
    else:
        chosen = summary["selected"]
        md += [f"{summary['pairs']} pairs, {len(sweep_rows)} lambdas; means over the pairs.", "",
               "| lambda | " + " | ".join(SUMMARY_KEYS) + " |", "|---" * (len(SUMMARY_KEYS) + 1) + "|"]
        md += [f"| {r['lambda']:g} | " + " | ".join(fmt(r[k]) for k in SUMMARY_KEYS) + " |" for r in sweep_rows]
        md += ["", f"Selected (best Dice with folding < 0.5 %): lambda {chosen['lambda']:g}" if chosen else
               "No lambda keeps folding < 0.5 % with a Dice score (labels needed)."]
    with atomic_dir(out) as tmp:
        (tmp / "per_pair.csv").write_text(buf.getvalue())
        (tmp / "summary.json").write_text(json.dumps({"summary": summary, "pairs": rows}, indent=1))
        (tmp / "summary.md").write_text("\n".join(md) + "\n")
        if sweep_rows is not None:
            sweep.plot_sweep(sweep_rows, tmp / "sweep.png", scores=("dice_mean",), title=f"{args.method} lambda sweep")
    report(f"wrote {out}")


def run_compare(args) -> dict:
    """Implementation of ``jaxreg compare``; returns the summary (``{set: {method: scores}}``)."""
    import csv
    import io
    import platform
    import shlex
    import subprocess
    import tempfile
    import time

    from jaxreg import compare

    out = pathlib.Path(args.out)
    previous = None
    if args.update:
        try:
            previous = json.loads((out / "results.json").read_text())
        except (OSError, ValueError) as e:
            raise CLIError(f"--update needs the results.json of an earlier run in {out}: {e}", EXIT_USAGE) from None
    else:
        _check_out_dir(out, COMPARE_OUTPUTS, args.overwrite)
    try:
        config = compare.load_config(args.config)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e), EXIT_USAGE) from None
    data = pathlib.Path(args.data or os.environ.get("JAXREG_DATA") or "../shared/data")
    if not data.is_dir():
        raise CLIError(f"data folder {data} does not exist (--data or JAXREG_DATA)")
    split = lambda v: [x.strip() for x in v.split(",") if x.strip()] if v else None  # noqa: E731
    report = _progress(args.quiet)
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".jaxreg_compare_", dir=out.parent) as work:
        try:
            rows, summary, methods, skipped, cases = compare.compare(
                config, data_root=data, workdir=pathlib.Path(work), methods=split(args.methods),
                sets=split(args.sets), report=report)
        except ValueError as e:
            raise CLIError(str(e), EXIT_USAGE) from None
    if not rows:
        raise CLIError("no method ran: " + "; ".join(f"{n}: {why}" for n, why in skipped))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True, cwd=pathlib.Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    meta = {"command": "jaxreg compare " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["compare"]
            else f"jaxreg compare --config {args.config} --out {args.out}",
            "date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "total_s": time.perf_counter() - t0}
    if previous is not None:  # keep the earlier rows of every (pair set, method) not run again
        rows, methods, skipped, meta = compare.merge(previous, rows, methods, skipped, meta, config)
        summary = compare.summarize(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["set", "pair", "method", *compare.SCORE_KEYS])
    w.writeheader()
    w.writerows(rows)
    with atomic_dir(out) as tmp:
        (tmp / "results.md").write_text(compare.markdown(config, summary, methods, skipped, meta, cases))
        (tmp / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows,
                                                      "skipped": skipped}, indent=1))
        (tmp / "per_pair.csv").write_text(buf.getvalue())
    report(f"wrote {out}/results.md ({len(methods)} methods, {len(rows)} registrations)")
    return summary


def run_apply(args):
    """Implementation of ``jaxreg apply``."""
    from jaxreg.io import apply_transform, load_image, load_labels, save_image

    out = pathlib.Path(args.out)
    if out.exists() and not args.overwrite:
        raise CLIError(f"{out} exists; pass --overwrite to replace")
    if not str(out).endswith((".nii", ".nii.gz")):
        raise CLIError(f"--out must be a .nii or .nii.gz path, got {out}")
    image = load_labels(args.image) if args.labels else load_image(args.image)
    reference = load_image(args.reference)
    if not pathlib.Path(args.transform).exists():
        raise CLIError(f"--transform {args.transform} does not exist")
    data = apply_transform(image, args.transform, reference, order=0 if args.labels else 1)
    save_image(out, data, reference.affine, overwrite=args.overwrite, dtype="int32" if args.labels else None)


def _enable_compilation_cache():
    """Persist XLA executables across runs (``$JAXREG_CACHE_DIR``, default ``~/.cache/jaxreg/xla``).

    Compiling the instance-optimisation loops takes tens of seconds on a CPU;
    with the cache a second ``jaxreg register`` on the same grid size starts at
    once. ``JAXREG_CACHE_DIR=`` (empty) disables it.
    """
    import jax

    path = os.environ.get("JAXREG_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "jaxreg", "xla"))
    if not path:
        return
    try:
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    except (OSError, AttributeError):  # read-only home or an old jax: run without the cache
        pass


def main(argv=None) -> int:
    """Console entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _enable_compilation_cache()
    try:
        if args.command == "register":
            run_register(args)
        elif args.command == "apply":
            run_apply(args)
        elif args.command == "evaluate":
            run_evaluate(args)
        elif args.command == "compare":
            run_compare(args)
        elif args.command == "demo":
            from jaxreg.demo import run_demo

            run_demo(out=args.out, overwrite=args.overwrite, seed=args.seed)
        return 0
    except CLIError as e:
        print(f"jaxreg {args.command}: error: {e}", file=sys.stderr)
        return e.code
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as e:
        print(f"jaxreg {args.command}: error: {e}", file=sys.stderr)
        return EXIT_INPUT


def _tune_malloc() -> bool:
    """Let glibc's ``malloc`` keep the memory it frees, for the rest of this process; False where not glibc.

    By default each thread gets its own arena, whose heaps (at most 64 MB) are unmapped once empty, and
    blocks over 128 kB-32 MB are ``mmap``-ed and unmapped when freed: the buffers of every XLA program run
    came back as fresh pages. A warm ``jaxreg register`` of the IXI pair took ~760k page faults, 1.7-2.2 s
    of system time on 2 cores. One arena (``M_ARENA_MAX``), no ``mmap`` (``M_MMAP_MAX``), and a heap that
    is not trimmed below 1 GB of free top memory and grows 256 MB at a time (``M_TRIM_THRESHOLD``,
    ``M_TOP_PAD``) reuse them: ~255k faults, warm -0.49 +- 0.15 s (10 ABBA pairs, 4.96 -> 4.56 s; issue 18,
    docs/design.md). Cost: at 1 mm the peak RSS grew from 3.7 to 4.6-4.9 GB (the call was 2 s faster). One
    arena makes compiling slower (threads compete for it: a cold call took 2-3 s longer), so
    :func:`run_register` asks for this only when the job will compile nothing, and only in the console
    script's own process (:func:`entry`), which exits when its job is done. Must run before JAX starts its
    threads (they keep the arena they first used). A store shared by machines of other CPU models may list
    programs this one compiles again: then this costs that compilation time, never correctness.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    m_trim_threshold, m_top_pad, m_mmap_max, m_arena_max = -1, -2, -4, -8  # glibc's <malloc.h>
    settings = ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 1 << 30), (m_top_pad, 256 << 20))
    return all([mallopt(param, value) == 1 for param, value in settings])


_OWN_PROCESS = False  # True in the console script (entry), whose process ends with its command


def entry() -> None:
    """The ``jaxreg`` console script: :func:`main`, then exit without the interpreter's teardown.

    Every output is complete and closed when :func:`main` returns; the teardown only frees JAX's compiled
    programs and buffers, which took 0.43 s of a warm 8.7 s ``jaxreg register`` on 2 cores (issue 18).

    Python's cyclic garbage collector is off in this process: tracing and lowering a cold call's programs
    makes many objects, and each collection holds the GIL that the compiling thread and the main thread
    share. IXI pair, 2 cores, cold: -0.21 +- 0.09 s (6 ABBA pairs; 9.8-9.9 s instead of 10.2-10.8 s in 3 runs
    each of an earlier test), peak RSS unchanged (1.3-1.4 GB). A cohort collects between pairs (0.1 s each,
    :func:`run_register`).
    """
    global _OWN_PROCESS
    _OWN_PROCESS = True
    gc.disable()
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
