"""Device mesh and shardings for data-parallel training (batch sharded, state replicated)."""
from __future__ import annotations

import os

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed() -> None:
    """Call ``jax.distributed.initialize()`` when launched as one process of several.

    Triggered by ``JAX_COORDINATOR_ADDRESS`` (or a cluster environment JAX
    auto-detects, e.g. SLURM/TPU pods, with ``JAXREG_DISTRIBUTED=1``); a
    no-op for a single process. Must run before any other JAX call.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("JAXREG_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1D ``('data',)`` mesh over the first ``num_devices`` devices (default: all, all hosts).

    Raises:
      ValueError: more devices requested than exist.
    """
    devices = jax.devices()
    n = len(devices) if num_devices is None else int(num_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"asked for {n} devices, have {len(devices)}")
    # Auto axis: XLA's sharding propagation places intermediates (data parallelism needs no more).
    return jax.make_mesh((n,), (DATA_AXIS,), devices=devices[:n], axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``'data'``; the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXIS))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Place a host batch (dict of numpy arrays, global batch first) on the mesh, batch-sharded.

    Single-process: ``jax.device_put``. Multi-process: each process passes
    its local slice and the global array is assembled with
    ``jax.make_array_from_process_local_data``.

    Raises:
      ValueError: batch size not divisible by the number of devices.
    """
    n = mesh.devices.size
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in batch.items():
        if jax.process_count() == 1:
            if v.shape[0] % n:
                raise ValueError(f"batch size {v.shape[0]} ({k}) is not divisible by {n} devices")
            out[k] = jax.device_put(v, sharding)
        else:
            out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out
