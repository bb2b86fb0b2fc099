"""Registration methods; each module exposes Config, init, loss_fn and register (docs/design.md)."""
import dataclasses

import jax
from flax import nnx

from jaxreg.methods import voxelmorph

METHODS = {"voxelmorph": voxelmorph}


def restore_model(config: dict, params: dict):
    """``(module, model)`` from a run's config dict and its pure-dict parameters (:func:`jaxreg.io.load_trained`).

    Raises:
      ValueError: unknown method, or parameters that do not fit the configured model.
    """
    name = config.get("method")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} in the run's config (known: {sorted(METHODS)})")
    mod = METHODS[name]
    fields = {f.name for f in dataclasses.fields(mod.Config)}
    cfg = mod.Config(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in config["model"].items() if k in fields})
    abstract = nnx.eval_shape(lambda: mod.init(jax.random.key(0), cfg))
    graphdef, state = nnx.split(abstract)
    try:
        nnx.replace_by_pure_dict(state, params)
    except (KeyError, ValueError) as e:
        raise ValueError(f"checkpoint parameters do not match the configured {name} model: {e}") from e
    return mod, nnx.merge(graphdef, state)
