"""Devices and hosts: multi-host start-up, the mesh, batches and parameters onto it, results
off it.

The mesh has two axes (`--mesh=data:N,fsdp:M`). Batch rows are split over both (each process
feeds its own rows). Parameters, gradients and optimizer state are sharded over `fsdp` along
their largest dimension that `fsdp` divides (fully sharded data parallel); leaves too small to
be worth it stay whole on every device, and with `fsdp:1` (the default, pure data parallel)
everything is replicated. Only annotations are written: XLA inserts the gathers and
reductions. With several processes only process 0 writes files.

When JAX's distributed service finds a fault (a peer that died, never joined, or joined
twice) it ends the process with a C++ abort and a stack dump; nothing in Python runs. So a
`--multihost` command runs its work in a child process (`supervise`) and, if the child is
aborted so, says why in one `error:` line.
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxpeft.errors import JaxpeftError, first_line


ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
_MESSAGE_BYTES = 2048


def initialize(multihost: bool, timeout_s: int = 60) -> None:
    """Joins the other processes of a multi-host job.

    With `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID` set, those are used (any cluster, or several processes on one machine);
    with none set, JAX detects the cluster (Cloud TPU, SLURM, Open MPI, Kubernetes). CPU
    processes talk through gloo. `timeout_s` bounds both the wait for every process to join
    and how long a silent peer is waited for before all stop.
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
        count, index = kwargs["num_processes"], kwargs["process_id"]
        if count < 1 or not 0 <= index < count:
            raise JaxpeftError(f"--multihost: JAX_PROCESS_ID={index} is not one of 0..{count - 1} "
                               f"(JAX_NUM_PROCESSES={count})")
        if index == 0:
            _check_coordinator_port(kwargs["coordinator_address"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=timeout_s,
                                   heartbeat_timeout_seconds=timeout_s)
    except (ValueError, RuntimeError) as e:
        raise JaxpeftError(f"--multihost: could not join the other processes "
                           f"({first_line(e)})") from None


def _check_coordinator_port(address: str) -> None:
    """Process 0 serves the coordinator: a port already taken means another process 0 (two
    processes given the same id) or another job on it."""
    port = address.rsplit(":", 1)[-1]
    if not port.isdigit():
        raise JaxpeftError(f"--multihost: JAX_COORDINATOR_ADDRESS={address!r} is not host:port")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", int(port)))
        except OSError:
            raise JaxpeftError(f"--multihost: port {port} of JAX_COORDINATOR_ADDRESS is in use: "
                               "another process 0 runs there (two processes with "
                               "JAX_PROCESS_ID=0?) or another program holds it") from None


# ---- the supervising parent of a multi-host command ----------------------------------------

WORKER_ENV = "JAXPEFT_MULTIHOST_WORKER"
# JAX's C++ log lines (glog format: "W1205 12:00:00.000 ...") and, after a fatal one, the
# abort's stack dump: the parent turns them into one line.
_GLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")
_FATAL = re.compile(r"^F\d{4} .*?\] (.*)")


def _explain(fatal: list, output_dir: str) -> str:
    """The one line for an abort by JAX's distributed service, from its fatal log line and
    the lines after it (`absl::Status: ...`, `RPC: <the call that failed>`)."""
    status = fatal[0].split("absl::Status:", 1)[-1].strip() or fatal[0]
    context = " ".join(fatal)
    who = f"process {os.environ.get('JAX_PROCESS_ID', '?')}"
    if "ALREADY_EXISTS" in status or "incarnation" in status:
        return (f"{who}: --multihost: another process joined with the same JAX_PROCESS_ID "
                f"({status}); give every process its own id")
    if "RegisterTask" in context or "register" in context.lower():
        return (f"{who}: --multihost: not every one of the JAX_NUM_PROCESSES="
                f"{os.environ.get('JAX_NUM_PROCESSES', '?')} processes joined within "
                f"--multihost_timeout ({status}); start them all with the same "
                "JAX_COORDINATOR_ADDRESS")
    steps = sorted(int(p.name) for p in (Path(output_dir) / "checkpoints").glob("*")
                   if p.name.isdigit()) if output_dir else []
    resume = (f"continue all processes with --resume (the last checkpoint is step {steps[-1]})"
              if steps else "no checkpoint was saved yet: start all processes again")
    return (f"{who}: a peer process died or stopped answering ({status}); every process "
            f"stops; {resume}")


def supervise(multihost: bool, output_dir: str = "") -> Optional[int]:
    """For a `--multihost` command: runs this same command as a child process and returns its
    exit status, turning an abort by JAX's distributed service (a dead, missing or duplicate
    peer) into one `error:` line naming the cause and the checkpoint to resume from. Returns
    None where the work should run in this process (no --multihost, or this is the child).

    The child runs in a process group of its own (signals reach it once, forwarded by the
    parent) and dies with the parent. Its standard output is the parent's; its standard
    error passes through, less JAX's C++ log lines."""
    if not multihost or os.environ.get(WORKER_ENV):
        return None

    def die_with_parent():  # Linux: the child gets SIGKILL when this process dies
        try:
            import ctypes
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    child = subprocess.Popen(sys.orig_argv, env={**os.environ, WORKER_ENV: "1"},
                             stderr=subprocess.PIPE, text=True, errors="replace",
                             start_new_session=True, preexec_fn=die_with_parent)
    previous = {sig: signal.signal(sig, lambda signum, _: child.send_signal(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    fatal = None  # the fatal log line and the few after it (the failed call is named there)
    try:
        for line in child.stderr:
            if fatal is None and _FATAL.match(line):
                fatal = [_FATAL.match(line).group(1)]
            elif fatal is not None and len(fatal) < 4:
                fatal.append(line.strip())
            if fatal is None and not _GLOG.match(line):
                sys.stderr.write(line)
                sys.stderr.flush()
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if fatal is not None and code in (-signal.SIGABRT, 128 + signal.SIGABRT):
        print(f"error: {_explain(fatal, output_dir)}", file=sys.stderr)
        return 1
    return code if code >= 0 else 128 - code


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


MESH_AXES = ("data", "fsdp")
# Leaves under this many elements stay whole on every device: biases, LayerNorm scales and
# low-rank factors cost little memory, and sharding them would add one gather each.
MIN_SHARDED_ELEMENTS = 2 ** 14


def parse_mesh(text: str) -> dict:
    """`'data:2,fsdp:4'` as `{'data': 2, 'fsdp': 4}` (`''`: `{}`); a bad part is one
    `JaxpeftError` naming it."""
    sizes = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, size = (x.strip() for x in part.partition(":"))
        if name not in MESH_AXES or not size.isdigit() or int(size) < 1:
            raise JaxpeftError(f"--mesh={text}: {part!r} is not axis:size with an axis of "
                               f"{', '.join(MESH_AXES)} and a size >= 1 (e.g. "
                               "--mesh=data:2,fsdp:4)")
        if name in sizes:
            raise JaxpeftError(f"--mesh={text}: axis {name} given twice")
        sizes[name] = int(size)
    return sizes


def mesh_shape(text: str, device_count: int) -> tuple:
    """`(data, fsdp)` for `--mesh=text` over `device_count` devices. An axis left out takes
    the devices the other leaves (`fsdp:4` on 8 devices is `data:2,fsdp:4`; `''` is
    `data:<all>`)."""
    sizes = parse_mesh(text)
    used = math.prod(sizes.values())
    if device_count % used or (len(sizes) == len(MESH_AXES) and used != device_count):
        raise JaxpeftError(f"--mesh={text} needs {used} devices"
                           f"{'' if len(sizes) == len(MESH_AXES) else ' (or a multiple)'}; "
                           f"this run has {device_count}")
    if "data" not in sizes:
        return device_count // used, sizes.get("fsdp", 1)
    return sizes["data"], device_count // sizes["data"]


def leaf_spec(shape: tuple, fsdp: int, min_elements: int = MIN_SHARDED_ELEMENTS) -> PartitionSpec:
    """Where one leaf of `shape` lives: split over `fsdp` along its largest dimension that
    `fsdp` divides (the first of equals), or whole on every device when it is small, no
    dimension divides, or `fsdp` is 1."""
    if fsdp == 1 or math.prod(shape) < min_elements:
        return PartitionSpec()
    fits = [d for d in range(len(shape)) if shape[d] % fsdp == 0]
    if not fits:
        return PartitionSpec()
    axis = max(fits, key=lambda d: (shape[d], -d))
    return PartitionSpec(*(("fsdp" if d == axis else None) for d in range(len(shape))))


def _shard_bytes(x: Any) -> int:
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    return math.prod(shape) * np.dtype(x.dtype).itemsize


class Sharder:
    """The run's mesh: host batches onto it (rows over every device) and parameter trees
    onto it (`place`: sharded over `fsdp` per `leaf_spec`)."""

    def __init__(self, mesh: str = "", devices: Optional[list] = None,
                 min_elements: int = MIN_SHARDED_ELEMENTS):
        devices = list(jax.devices() if devices is None else devices)
        self.shape = dict(zip(MESH_AXES, mesh_shape(mesh, len(devices))))
        self.min_elements = min_elements
        # Auto axes: the compiler propagates the shardings through the model (GSPMD).
        self.mesh = jax.make_mesh(tuple(self.shape.values()), MESH_AXES,
                                  axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                                  devices=devices)
        self.data = NamedSharding(self.mesh, PartitionSpec(MESH_AXES))

    def describe(self) -> str:
        """`data:2,fsdp:4`."""
        return ",".join(f"{k}:{v}" for k, v in self.shape.items())

    def shardings(self, tree: Any) -> Any:
        """A `NamedSharding` per leaf of `tree` (arrays or `jax.ShapeDtypeStruct`s)."""
        return jax.tree.map(lambda x: NamedSharding(self.mesh, leaf_spec(
            x.shape, self.shape["fsdp"], self.min_elements)), tree)

    def place(self, tree: Any) -> Any:
        """`tree` on the mesh per `shardings` (leaves already placed so are not copied)."""
        return jax.device_put(tree, self.shardings(tree))

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
        """Host numpy copies of (possibly multi-host, possibly sharded) arrays; with several
        processes a collective that every process must call."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return multihost_utils.process_allgather(tree, tiled=True)
        return jax.device_get(tree)


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of `tree`'s arrays (its shard of each; the whole of a
    replicated leaf)."""
    return sum(_shard_bytes(x) for x in jax.tree.leaves(tree))
