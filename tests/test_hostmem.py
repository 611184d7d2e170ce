"""The host malloc policy (`jaxpeft.hostmem`): freed memory kept and reused under `keep`,
glibc's defaults under `system`, a user's GLIBC_TUNABLES respected."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

# Allocates a block, writes every page, frees it, then does the same again and prints the
# page faults of the second pass: with the memory kept, the second pass reuses faulted pages.
_PROBE = r"""
import ctypes, json, resource, sys
from jaxpeft import hostmem
text = hostmem.set_policy(sys.argv[1])
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
def touch():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"text": text, "faults": faults}))
"""

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or
                           not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"),
                           reason="mallopt is glibc's (Linux)")


def _probe(policy, tunables=None):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    proc = subprocess.run([sys.executable, "-c", _PROBE, policy], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@glibc
def test_keep_reuses_freed_memory_without_faulting_it_in_again():
    pages = (256 << 20) // os.sysconf("SC_PAGE_SIZE")
    keep, system = _probe("keep"), _probe("system")
    assert keep["text"] == "keep (mallopt: mmap_max=0, trim_threshold=-1, arena_max=1)"
    assert system["text"] == "system"
    # Kept: the second pass touches pages the first faulted in (a few for Python itself).
    assert keep["faults"] < pages // 100, keep
    # glibc's default maps the block anew each time (fewer faults where huge pages back it).
    assert system["faults"] > 10 * max(keep["faults"], 1), (keep, system)


@glibc
def test_a_users_malloc_tunables_are_kept():
    kept = _probe("keep", tunables="glibc.malloc.trim_threshold=1")
    assert kept["text"] == "GLIBC_TUNABLES=glibc.malloc.trim_threshold=1 (kept; keep not applied)"
    assert _probe("system", tunables="glibc.malloc.trim_threshold=1")["text"] == \
        "GLIBC_TUNABLES=glibc.malloc.trim_threshold=1"


def test_an_unknown_policy_is_refused():
    from jaxpeft import hostmem

    with pytest.raises(ValueError, match="expected one of"):
        hostmem.set_policy("huge")
