"""Data parallelism with ``jax.sharding``: the mesh, the two shardings, multi-host start-up.

One ``Mesh`` with a single ``"data"`` axis over the devices in use.  The
batch carries ``NamedSharding(mesh, P("data"))`` (split along B), everything
else (parameters, BatchNorm statistics, optimiser state, EMA, logs) is
replicated (``P()``).  The train step is one ``jax.jit`` with those in/out
shardings: XLA inserts the cross-device reductions, so BatchNorm statistics
and the loss normalisation are over the *global* batch, exactly as on one
device.

Multi-host: launched with the standard coordinator environment
(``JAX_COORDINATOR_ADDRESS=host:port``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``; the last two may be left to JAX's cluster detection on
SLURM, Open MPI or Kubernetes), or with ``JAXYOLO_DISTRIBUTED=1`` on a
cluster JAX detects entirely by itself (a Cloud TPU slice),
:func:`init_distributed` calls ``jax.distributed.initialize`` before anything
touches a device.  On CPUs the cross-process collectives need
``JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo``.
"""

from __future__ import annotations

import os

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["init_distributed", "make_mesh", "check_batch", "batch_sharding", "replicated", "fetch"]



def init_distributed() -> bool:
    """``jax.distributed.initialize`` when this process was launched as one of
    several (see the module docstring).  Idempotent; returns whether the
    process is part of a multi-process run."""
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        num, pid = env.get("JAX_NUM_PROCESSES"), env.get("JAX_PROCESS_ID")
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(num) if num else None,
            process_id=int(pid) if pid else None,
        )
        return True
    if env.get("JAXYOLO_DISTRIBUTED") == "1":
        jax.distributed.initialize()
        return True
    return False


def make_mesh(devices: int | None = None) -> Mesh:
    """A 1-D ``("data",)`` mesh over the first ``devices`` local devices
    (``None``: every device of every process)."""
    if devices is None:
        return Mesh(jax.devices(), ("data",))
    if jax.process_count() > 1:
        raise ValueError("devices: a multi-process run uses every device of every process; do not pass --devices")
    local = jax.local_devices()
    if not isinstance(devices, int) or isinstance(devices, bool) or not 1 <= devices <= len(local):
        raise ValueError(f"devices must be an int in [1, {len(local)}] (the local {jax.default_backend()} devices), got {devices!r}")
    return Mesh(local[:devices], ("data",))


def check_batch(batch: int, mesh: Mesh, *, name: str = "batch") -> None:
    n = mesh.devices.size
    if batch % n:
        raise ValueError(f"{name}={batch} is not divisible by the {n} devices in use; pass a {name} that is a multiple of {n} (or --devices)")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split the leading (batch) axis over ``"data"``."""
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fetch(tree):
    """Device values to host numpy, gathering the global value in a multi-process run."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
