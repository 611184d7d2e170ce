"""Host memory: glibc's malloc told to keep the memory a train step frees.

XLA:CPU allocates a step's scratch buffers afresh on every step (about 1.3 GiB for a MiniLM
full fine-tuning step at 32x128) and frees them when it ends. glibc gives such blocks back to
the kernel (large blocks are separate maps, unmapped on free; the heap's top is trimmed; the
worker threads' arenas shrink), so the next step faults in and zeroes every 4-KiB page again:
millions of page faults a minute, which cost a large share of the step on the
virtual machines measured (docs/performance.md). `keep_freed_memory()` sets three documented `mallopt`
parameters so that freed memory stays in the process and is reused: no separate maps for
large blocks (`M_MMAP_MAX` 0), no trimming (`M_TRIM_THRESHOLD` -1) and one arena for all
threads (`M_ARENA_MAX` 1: other threads' arenas are maps of their own that come and go). The
price is resident memory: the process keeps its peak until it exits.

The commands apply it before JAX starts (`--host_malloc=keep`, the default; `system` leaves
glibc's defaults). It is a no-op with a reason where the C library has no `mallopt` (macOS,
musl) and where `GLIBC_TUNABLES` already sets a `glibc.malloc.` tunable: that is the user's
own choice and is kept.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional

POLICIES = ("keep", "system")

# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
KEEP = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_ARENA_MAX, 1))
KEEP_TEXT = "keep (mallopt: mmap_max=0, trim_threshold=-1, arena_max=1)"

_in_force = {"text": None}


def _mallopt() -> Optional[ctypes._CFuncPtr]:
    """The process's `mallopt`, or None where its C library has none."""
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def _user_tunables() -> str:
    """`GLIBC_TUNABLES` when it names a malloc tunable (empty otherwise)."""
    value = os.environ.get("GLIBC_TUNABLES", "")
    return value if "glibc.malloc." in value else ""


def keep_freed_memory() -> str:
    """Tells glibc's malloc to keep freed memory in the process (module docstring); returns
    `describe()`. Call it before JAX allocates: arenas that threads already hold stay."""
    tunables = _user_tunables()
    if tunables:
        _in_force["text"] = f"GLIBC_TUNABLES={tunables} (kept; keep not applied)"
        return describe()
    mallopt = _mallopt()
    if mallopt is None:
        _in_force["text"] = "system (the C library has no mallopt)"
        return describe()
    refused = [param for param, value in KEEP if mallopt(param, value) != 1]
    # A refused parameter leaves the others set: say which, not "keep".
    _in_force["text"] = (KEEP_TEXT if not refused
                         else f"keep in part (mallopt refused parameters {refused})")
    return describe()


def set_policy(policy: str) -> str:
    """Applies a `--host_malloc` value (`POLICIES`); returns `describe()`."""
    if policy not in POLICIES:
        raise ValueError(f"host malloc policy {policy!r}: expected one of {POLICIES}")
    return keep_freed_memory() if policy == "keep" else describe()


def describe() -> str:
    """What the process's malloc runs with, for config.json and the benchmarks' headers:
    the policy applied here, else the user's `GLIBC_TUNABLES`, else `system`."""
    if _in_force["text"]:
        return _in_force["text"]
    tunables = _user_tunables()
    return f"GLIBC_TUNABLES={tunables}" if tunables else "system"
