"""Pretrained weights shipped inside the package (safetensors + a JSON config), loaded with importlib.resources.

Each entry ``NAME`` is two files in this folder: ``NAME.safetensors`` (the
model parameters, flat keys ``a/b/c`` of the NNX pure-dict layout) and
``NAME.json`` (``{"method": ..., "model": {...}, "training": {...}}``: the
method's Config and how the weights were trained). Nothing is downloaded.

Command line::

    python -m jaxreg.weights export RUN_DIR jaxreg/weights/NAME   # from a train/ run directory
    python -m jaxreg.weights list
"""
from __future__ import annotations

import importlib.resources
import json
import pathlib
import sys

import numpy as np

SHIPPED = ("dns_brain", "keymorph_brain")
MAX_BYTES = 5 * 1024 * 1024


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = np.ascontiguousarray(np.asarray(v))
    return out


def _unflatten(flat):
    tree = {}
    for key, v in flat.items():
        node = tree
        parts = key.split("/")
        for p in parts[:-1]:
            node = node.setdefault(int(p) if p.isdigit() else p, {})
        node[int(parts[-1]) if parts[-1].isdigit() else parts[-1]] = v
    return tree


def save_weights(prefix, config: dict, params: dict) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``prefix.safetensors`` and ``prefix.json``; returns both paths.

    Raises:
      ValueError: the weights exceed 5 MB, or ``config`` lacks ``method``/``model``.
    """
    from safetensors.numpy import save_file

    if "method" not in config or "model" not in config:
        raise ValueError("config needs 'method' and 'model'")
    prefix = pathlib.Path(prefix)
    flat = _flatten(params)
    size = sum(v.nbytes for v in flat.values())
    if size > MAX_BYTES:
        raise ValueError(f"weights are {size / 1e6:.1f} MB, over the 5 MB limit for shipped weights")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    st, js = prefix.with_suffix(".safetensors"), prefix.with_suffix(".json")
    save_file(flat, str(st))
    st.chmod(0o644)
    js.write_text(json.dumps(config, indent=1) + "\n")
    return st, js


def read_weights(path) -> tuple[dict, dict]:
    """``(config, params)`` from a ``.safetensors`` file with its ``.json`` beside it.

    Raises:
      FileNotFoundError: either file is missing.
      ValueError: a file that is not a readable safetensors / JSON config.
    """
    from safetensors.numpy import load_file

    st = pathlib.Path(path)
    if st.suffix != ".safetensors":
        st = st.with_suffix(".safetensors")
    js = st.with_suffix(".json")
    for p in (st, js):
        if not p.is_file():
            raise FileNotFoundError(f"weights file {p} not found")
    try:
        flat = load_file(str(st))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{st} is not a readable safetensors file: {e}") from e
    try:
        config = json.loads(js.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{js} is not valid JSON: {e}") from e
    if not isinstance(config, dict) or "method" not in config or "model" not in config:
        raise ValueError(f"{js} lacks 'method' and 'model'")
    return config, _unflatten(flat)


def shipped_path(name: str) -> pathlib.Path:
    """Path of a shipped ``NAME.safetensors`` inside the installed package.

    Raises:
      ValueError: unknown name.
    """
    if name not in SHIPPED:
        raise ValueError(f"unknown shipped weights {name!r} (shipped: {', '.join(SHIPPED)})")
    res = importlib.resources.files("jaxreg.weights").joinpath(f"{name}.safetensors")
    return pathlib.Path(str(res))


def load_model(path_or_name: str, *, method: str | None = None):
    """``(module, model, config)`` from shipped weights (a name in ``SHIPPED``) or a ``.safetensors`` path.

    Args:
      path_or_name: ``"dns_brain"`` or a path to ``*.safetensors`` (its JSON beside it).
      method: if given, the weights must belong to this method.

    Raises:
      FileNotFoundError: missing files.
      ValueError: unreadable files, another method's weights, or parameters
        that do not fit the configured model.
    """
    from jaxreg.methods import restore_model

    path = shipped_path(path_or_name) if path_or_name in SHIPPED else pathlib.Path(path_or_name)
    config, params = read_weights(path)
    if method is not None and config["method"] != method:
        raise ValueError(f"{path} holds weights of method {config['method']!r}, not {method!r}")
    module, model = restore_model(config, params)
    return module, model, config


def export_run(run_dir, prefix, *, command: str | None = None) -> tuple[pathlib.Path, pathlib.Path]:
    """Export the latest checkpoint of a ``train/`` run directory as shipped weights."""
    from jaxreg.io.checkpoint import load_trained

    config, params, step = load_trained(run_dir)
    meta = {"method": config["method"], "model": config["model"],
            "training": {"run": str(run_dir), "step": step, "command": command, "data": config.get("data")}}
    return save_weights(prefix, meta, params)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["list"]:
        for n in SHIPPED:
            print(n, shipped_path(n))
        return 0
    if len(argv) >= 3 and argv[0] == "export":
        st, js = export_run(argv[1], argv[2], command=" ".join(argv[3:]) or None)
        print(f"wrote {st} ({st.stat().st_size / 1e6:.2f} MB) and {js}")
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
