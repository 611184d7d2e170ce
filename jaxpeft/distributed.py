"""Devices and hosts: multi-host start-up, the `data` mesh, batches onto it, results off it.

Batches are split over the `data` axis (each process feeds its own rows); parameters and
optimizer state are replicated. With several processes only process 0 writes files.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxpeft.errors import JaxpeftError, first_line


ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
_MESSAGE_BYTES = 2048


def initialize(multihost: bool) -> None:
    """Joins the other processes of a multi-host job.

    With `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID` set, those are used (any cluster, or several processes on one machine);
    with none set, JAX detects the cluster (Cloud TPU, SLURM, Open MPI, Kubernetes). CPU
    processes talk through gloo.
    """
    if not multihost:
        return
    values = {k: os.environ.get(k, "") for k in ENV}
    kwargs = {}
    if any(values.values()):
        missing = [k for k, v in values.items() if not v]
        if missing:
            raise JaxpeftError(f"--multihost: {', '.join(missing)} not set; set all of {', '.join(ENV)} "
                               "or none (auto-detection on TPU, SLURM, MPI, Kubernetes)")
        try:
            kwargs = dict(coordinator_address=values["JAX_COORDINATOR_ADDRESS"],
                          num_processes=int(values["JAX_NUM_PROCESSES"]),
                          process_id=int(values["JAX_PROCESS_ID"]))
        except ValueError:
            raise JaxpeftError("--multihost: JAX_NUM_PROCESSES and JAX_PROCESS_ID must be "
                               "integers") from None
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:
        raise JaxpeftError(f"--multihost: could not join the other processes "
                           f"({first_line(e)})") from None


def agree(fn: Callable[[], Any]) -> Any:
    """Runs `fn` on every process; if it raises a `JaxpeftError` on any of them, all raise
    the first such message (by process index), so no process is left waiting for the others
    in a collective. One process: just `fn()`."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    result, message = None, ""
    try:
        result = fn()
    except JaxpeftError as e:
        message = f"process {jax.process_index()}: {e}"
    encoded = np.zeros(_MESSAGE_BYTES, np.uint8)
    raw = message.encode()[:_MESSAGE_BYTES]
    encoded[:len(raw)] = np.frombuffer(raw, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(encoded))
    for row in every.reshape(-1, _MESSAGE_BYTES):
        text = bytes(row).rstrip(b"\0").decode(errors="replace")
        if text:
            raise JaxpeftError(text)
    return result


def is_writer() -> bool:
    """True on the one process that writes the run's files."""
    return jax.process_index() == 0


class Sharder:
    """Puts host batches onto the `data` mesh axis and replicates parameters."""

    def __init__(self):
        # Auto axes: the compiler propagates the batch sharding through the model (GSPMD).
        self.mesh = jax.make_mesh((jax.device_count(),), ("data",),
                                  axis_types=(jax.sharding.AxisType.Auto,))
        self.data = NamedSharding(self.mesh, PartitionSpec("data"))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())

    def replicate(self, tree: Any) -> Any:
        """The tree on every device (arrays already placed so are not copied)."""
        return jax.device_put(tree, self.replicated)

    def batch(self, batch: dict) -> dict:
        """Device arrays for the model inputs, labels and weights (this process's rows)."""
        out = {}
        for k, v in batch.items():
            if k == "index":  # host-side bookkeeping only
                continue
            per = v.shape[0] // jax.process_count()
            lo = jax.process_index() * per
            out[k] = jax.make_array_from_process_local_data(self.data, v[lo:lo + per])
        return out

    def gather(self, tree: Any) -> Any:
        """Host numpy copies of (possibly multi-host) arrays."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return multihost_utils.process_allgather(tree, tiled=True)
        return jax.device_get(tree)
