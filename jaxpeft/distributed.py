"""Devices and hosts: multi-host start-up, the `data` mesh, batches onto it, results off it.

Batches are split over the `data` axis (each process feeds its own rows); parameters and
optimizer state are replicated. With several processes only process 0 writes files.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec


def initialize(multihost: bool) -> None:
    """Joins the other processes of a multi-host job (TPU pods, multi-host GPU)."""
    if multihost:
        jax.distributed.initialize()


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
