"""Registration methods; each module exposes Config, init, loss_fn and register (docs/design.md)."""
import dataclasses

import jax
from flax import nnx

from jaxreg.methods import car, contrareg, deepsim, dns, features, keymorph, voxelmorph

METHODS = {"car": car, "contrareg": contrareg, "deepsim": deepsim, "dns": dns, "features": features,
           "keymorph": keymorph, "voxelmorph": voxelmorph}


@nnx.jit
def _forward(model, x):
    return model(x)


def forward_one(model, image, what: str):
    """``model`` on one ``(*spatial, 1)`` image (jitted, batch of 1), returning its unbatched output.

    Raises:
      ValueError: an image whose rank or channels do not match ``model.ndim`` (``what`` names the caller).
    """
    import jax.numpy as jnp

    image = jnp.asarray(image, jnp.float32)
    if image.ndim != model.ndim + 1 or image.shape[-1] != 1:
        raise ValueError(f"{what} expects a (*spatial[{model.ndim}], 1) image, got {image.shape}")
    return _forward(model, image[None])[0]


def method_config(name: str, model: dict):
    """``(module, module.Config)`` for method ``name`` from a mapping of its model options (lists -> tuples).

    Raises:
      ValueError: unknown method or unknown options.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (known: {sorted(METHODS)})")
    mod = METHODS[name]
    fields = {f.name for f in dataclasses.fields(mod.Config)}
    unknown = set(model.keys()) - fields
    if unknown:
        raise ValueError(f"unknown model options for {name}: {sorted(unknown)}")
    return mod, mod.Config(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in model.items()})


def restore_model(config: dict, params: dict):
    """``(module, model)`` from a run's config dict and its pure-dict parameters (:func:`jaxreg.io.load_trained`).

    Raises:
      ValueError: unknown method, or parameters that do not fit the configured model.
    """
    name = config.get("method")
    model_opts = dict(config["model"])
    if "features_checkpoint" in model_opts:  # the frozen extractor is part of ``params``: do not read its run
        model_opts["features_checkpoint"] = ""
    mod, cfg = method_config(name, model_opts)
    abstract = nnx.eval_shape(lambda: mod.init(jax.random.key(0), cfg))
    graphdef, state = nnx.split(abstract)
    def flat(tree):  # "a/0/b" -> shape; checkpoints may spell list indices as str
        return {"/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path): tuple(getattr(v, "shape", ()))
                for path, v in jax.tree_util.tree_leaves_with_path(tree)}

    expected, got = flat(nnx.to_pure_dict(state)), flat(params)
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise ValueError(f"checkpoint parameters do not match the configured {name} model: "
                         f"missing {missing[:3]}, unexpected {extra[:3]}, wrong shapes "
                         f"{[(k, got[k], expected[k]) for k in wrong[:3]]}")
    try:
        nnx.replace_by_pure_dict(state, params)
    except (KeyError, ValueError) as e:
        raise ValueError(f"checkpoint parameters do not match the configured {name} model: {e}") from e
    return mod, nnx.merge(graphdef, state)
