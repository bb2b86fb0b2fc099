"""Read a training run's configuration and parameters (written by ``train/``) without the training code."""
from __future__ import annotations

import json
import pathlib


def _strip_value(tree):
    """Orbax stores NNX variables as ``{'value': array}``; return the plain nested dict of arrays."""
    if isinstance(tree, dict):
        if set(tree) == {"value"} and not isinstance(tree["value"], dict):
            return tree["value"]
        return {k: _strip_value(v) for k, v in tree.items()}
    return tree


def load_trained(workdir, *, step: int | None = None) -> tuple[dict, dict, int]:
    """``(config, params, step)`` of a training run directory.

    Args:
      workdir: the ``--workdir`` of ``python -m train.main`` (holds
        ``config.json`` and ``checkpoints/``).
      step: checkpoint step (default: the latest).

    Returns:
      The run's configuration (a dict, as ``config.json``), the model
      parameters as a nested dict of numpy arrays (NNX pure-dict layout), and
      the step restored.

    Raises:
      FileNotFoundError: no ``config.json`` or no checkpoint in ``workdir``.
    """
    import orbax.checkpoint as ocp

    workdir = pathlib.Path(workdir)
    cfg_path = workdir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{workdir} is not a training run directory (no config.json)")
    config = json.loads(cfg_path.read_text())
    ckdir = (workdir / "checkpoints").absolute()
    if not ckdir.is_dir():
        raise FileNotFoundError(f"no checkpoints under {workdir}")
    with ocp.CheckpointManager(ckdir, item_names=("state", "data")) as mgr:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {ckdir}")
        out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return config, _strip_value(out["state"]["params"]), int(step)


def run_resolution(config: dict) -> float:
    """The grid spacing (mm) a run was trained at: ``config["data"]["resolution"]`` of :func:`load_trained`'s
    configuration (2.0, the training stack's default, when the run does not state it)."""
    return float(config.get("data", {}).get("resolution", 2.0))
