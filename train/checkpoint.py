"""Orbax checkpoints of the whole training state plus the grain iterator position."""
from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Periodic checkpoints under ``directory`` keeping the newest ``keep``.

    Each checkpoint holds ``state`` (a pytree: params, optimizer state, step,
    PRNG key data) and ``data`` (the grain iterator state, JSON).
    """

    def __init__(self, directory, *, keep: int = 3):
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict) -> None:
        self.manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             data=ocp.args.JsonSave(data_state)))

    def restore(self, abstract_state, step: int | None = None):
        """``(state, data_state)`` of ``step`` (default: latest) restored into ``abstract_state``'s structure,
        dtypes and shardings (a pytree of ``jax.ShapeDtypeStruct``)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, sharding):
    """``jax.ShapeDtypeStruct`` pytree of ``tree`` with ``sharding`` on every leaf."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
