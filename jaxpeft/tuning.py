"""`--train_step_xla_options=auto`: the train step's XLA options chosen by timing them.

Which library runs a CPU step's matrix products, and what XLA fuses into them, changes the
step time by up to 17 %, and which choice wins differs between CPUs, methods and shapes
(docs/performance.md), so it is measured on the machine at hand rather than read from a
table: every candidate option set compiles the real step, the candidates are timed in
turn on the run's own batch and state (copies; the run's are untouched), and the fastest
wins if it beats XLA's default by `MARGIN`. The choice is cached per machine, library
versions and program (model config, method, batch shape, dtype, mesh) in
`<cache_dir>/xla/step_options.json`, so the next run of a sweep skips the measurement. The
options pick kernels, not the math: losses agree to float rounding.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from jaxpeft.fileio import atomic_write_json

AUTO = "auto"

# The option sets tried on each backend, XLA's default first. On CPU: YNNPACK fusions as
# XLA makes them, none (XLA's own dot kernels), only reductions, only the products, products
# with reductions. Backends without an entry keep the default.
CANDIDATES = {"cpu": (
    {},
    {"xla_cpu_experimental_ynn_fusion_type": ""},
    {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"},
    {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    {"xla_cpu_experimental_ynn_fusion_type":
     "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"},
)}
# A candidate replaces the default only when its median step is this much shorter: steps of
# one program vary by a few per cent between rounds, and a tie is no reason to leave the
# default kernels.
MARGIN = 0.03
ROUNDS = 3


def cpuinfo() -> dict:
    """The first processor's fields of /proc/cpuinfo (`model name`, `flags`, ...); empty
    where there is no such file."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def machine_key() -> dict:
    """What a timing depends on besides the program: CPU model and flags, usable cores,
    devices, jax and jaxlib versions."""
    cpu = cpuinfo()
    flags = cpu.get("flags", cpu.get("Features", ""))
    return {"cpu": cpu.get("model name", ""),
            "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:16],
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "devices": f"{jax.devices()[0].device_kind} x {jax.device_count()}",
            "jax": jax.__version__, "jaxlib": jaxlib.__version__}


def program_key(program: dict) -> str:
    """The cache key of a step program described by `program` on this machine."""
    text = json.dumps({"machine": machine_key(), "program": program}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def usable_candidates(backend: str, check: Callable[[dict], None]) -> list[dict]:
    """This backend's candidates that this jaxlib takes (`check` raises on a refused set:
    the options are experimental and come and go between versions)."""
    usable = []
    for options in CANDIDATES.get(backend, ({},)):
        try:
            check(options)
        except Exception:  # noqa: BLE001 - any refusal drops the candidate, nothing else
            continue
        usable.append(options)
    return usable


def time_candidates(build: Callable[[dict], Callable], candidates: Sequence[dict],
                    state: Any, batch: Any, rng: jax.Array, frozen: Any,
                    rounds: int = ROUNDS) -> list[float]:
    """Median seconds of one train step per candidate: each compiled by `build(options)`
    and warmed once, then stepped once per round in turn (so that the machine's drift
    cannot pass for a difference) on a fresh copy of `state` (the step donates its state)."""
    steps = [build(options) for options in candidates]

    def once(step) -> float:
        fresh = jax.block_until_ready(jax.tree.map(jnp.copy, state))
        start = time.perf_counter()
        jax.block_until_ready(step(fresh, batch, rng, frozen))
        return time.perf_counter() - start

    for step in steps:
        once(step)
    times = [[] for _ in steps]
    for _ in range(rounds):
        for i, step in enumerate(steps):
            times[i].append(once(step))
    return [float(np.median(t)) for t in times]


def pick(candidates: Sequence[dict], seconds: Sequence[float],
         margin: float = MARGIN) -> dict:
    """The fastest candidate if it beats the first (the default) by `margin`, else the
    first."""
    best = int(np.argmin(seconds))
    return dict(candidates[best] if seconds[best] < (1 - margin) * seconds[0]
                else candidates[0])


def choose(build: Callable[[dict], Callable], check: Callable[[dict], None], state: Any,
           batch: Any, rng: jax.Array, frozen: Any) -> tuple[dict, list[dict]]:
    """`(options, measured)`: the fastest of this backend's usable candidates for the step
    that `build(options)` compiles (`pick`), and each candidate's median step in ms (empty
    where the backend has one candidate or none, and the default is kept untimed)."""
    candidates = usable_candidates(jax.default_backend(), check)
    if len(candidates) < 2:
        return {}, []
    seconds = time_candidates(build, candidates, state, batch, rng, frozen)
    return pick(candidates, seconds), [{"options": c, "step_ms": round(1e3 * t, 1)}
                                       for c, t in zip(candidates, seconds)]


def describe(options: dict) -> str:
    """`xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE`, or `XLA's default`;
    an empty value is written `''`, so the text pastes into a shell as the flag's value."""
    shown = {k: "''" if v == "" else v for k, v in options.items()}
    return ";".join(f"{k}={v}" for k, v in shown.items()) or "XLA's default"


class OptionsCache:
    """Chosen option sets by `program_key`, in one JSON file (None: nothing kept)."""

    def __init__(self, path: Optional[Path]):
        self.path = path

    def _read(self) -> dict:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # a damaged cache only costs a new measurement
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> Optional[dict]:
        """The options chosen earlier for `key`, or None."""
        entry = self._read().get(key)
        return dict(entry["options"]) if isinstance(entry, dict) and \
            isinstance(entry.get("options"), dict) else None

    def put(self, key: str, options: dict, measured: list) -> None:
        """Keeps `options` for `key`, with what was measured (for a reader of the file)."""
        if self.path is None:
            return
        data = self._read()
        data[key] = {"options": options, "measured": measured}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, data)
