"""Host memory: glibc's malloc set to back XLA's per-step scratch with transparent huge pages.

XLA:CPU allocates one scratch buffer per run of a compiled program (1.3 GiB for a MiniLM full
fine-tuning step at 32 x 128 tokens) from a worker thread, and frees it at the end. glibc serves
a thread's allocation that large with a fresh `mmap` and unmaps it on `free`, so every step the
kernel faults in and zeroes every page again: 344,000 4-KiB page faults a step, about a fifth of
its time on a 2-core machine (benchmarks/RESULTS.md section 5k). The glibc tunable
`glibc.malloc.hugetlb=1` makes malloc advise transparent huge pages for such maps: 2-MiB pages,
under a thousand faults a step, and MiniLM steps at 32 x 128 take 21-24 % less time. glibc reads
tunables only when a program starts, so the command-line scripts start themselves again once
with it set (`restart_with_tuned_malloc`); the process keeps its pid, arguments, standard
streams and everything else in its environment.

Nothing happens where it cannot help: off Linux, with glibc older than 2.35 or another C library
(musl), transparent huge pages switched off (`/sys/kernel/mm/transparent_hugepage/enabled` is
`[never]`), `GLIBC_TUNABLES` already naming a `glibc.malloc.hugetlb` value (the user's choice
stands), or `JAXPEFT_TUNE_MALLOC=0` set.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb"
VALUE = "1"  # madvise(MADV_HUGEPAGE) on malloc's maps; 2 would need reserved hugetlbfs pages
OPT_OUT = "JAXPEFT_TUNE_MALLOC"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def _glibc_version() -> Optional[tuple]:
    name, version = platform.libc_ver()
    if name != "glibc":
        return None
    try:
        return tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return None


def _thp_usable(setting_path: str = THP_SETTING) -> bool:
    """Whether the kernel gives transparent huge pages to a range malloc advises."""
    try:
        with open(setting_path) as f:
            setting = f.read()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def _hugetlb_setting(environ: Mapping[str, str]) -> Optional[str]:
    """The `glibc.malloc.hugetlb=...` entry of `GLIBC_TUNABLES`, if any."""
    for t in environ.get("GLIBC_TUNABLES", "").split(":"):
        if t.split("=", 1)[0] == TUNABLE:
            return t
    return None


def tuned_environ(environ: Mapping[str, str], glibc: Optional[tuple] = None,
                  thp_usable: Optional[bool] = None) -> Optional[dict]:
    """The environment to start this program again with, or None where the tuning is
    already in place, opted out of, or of no use here (see the module docstring).

    `glibc` (major, minor) and `thp_usable` default to this machine's."""
    if environ.get(OPT_OUT, "1") == "0":
        return None
    if _hugetlb_setting(environ) is not None or sys.platform != "linux":
        return None
    glibc = _glibc_version() if glibc is None else glibc
    if glibc is None or glibc < MIN_GLIBC:
        return None
    if not (_thp_usable() if thp_usable is None else thp_usable):
        return None
    env = dict(environ)
    tunables = environ.get("GLIBC_TUNABLES", "")
    env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, f"{TUNABLE}={VALUE}") if t)
    return env


def restart_with_tuned_malloc() -> None:
    """Replaces this process by the same command with `glibc.malloc.hugetlb=1` in force, if
    `tuned_environ` says it helps; otherwise returns. Call it first in a command-line entry
    point, before any work: nothing after it runs twice."""
    env = tuned_environ(os.environ)
    # A program read from standard input cannot be read again.
    if env is None or not sys.executable or sys.argv[:1] == ["-"]:
        return
    # Buffered output would be lost with the old process image.
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def use_tuned_malloc(tuned: bool) -> str:
    """Tuned (`restart_with_tuned_malloc`) or glibc's default malloc for this process and,
    through the environment they inherit, its children (`JAXPEFT_TUNE_MALLOC=0`, so a jaxpeft
    command started by it does not tune itself). Benchmarks call it so that both sides of a
    comparison run under one setting. Returns that setting (`describe`)."""
    if tuned:
        restart_with_tuned_malloc()
    else:
        os.environ[OPT_OUT] = "0"
    return describe(os.environ)


def describe(environ: Mapping[str, str]) -> str:
    """The glibc tunables in force (`glibc.malloc.hugetlb=1`, with any the user set beside
    it), or `default`: for benchmark output and a run's config.json."""
    return environ.get("GLIBC_TUNABLES") or "default"
