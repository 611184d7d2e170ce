"""The malloc tuning the command-line scripts restart with (jaxpeft.hostmem)."""

import os
import subprocess
import sys
import textwrap

import pytest

from jaxpeft import hostmem


def _unset_environ() -> dict:
    """This environment without the tuning or the opt-out: what a user's shell starts with."""
    return {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.OPT_OUT)}


ON_LINUX = pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables are Linux's")
NO_RESTART = hostmem.tuned_environ(_unset_environ()) is None
NEEDS_RESTART = pytest.mark.skipif(
    NO_RESTART, reason="this machine gets no malloc tuning (not glibc >= 2.35, or transparent "
    "huge pages off)")


@ON_LINUX
def test_tuned_environ_adds_the_tunable_and_keeps_the_rest():
    environ = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "PATH": "/bin"}
    env = hostmem.tuned_environ(environ, glibc=(2, 36), thp_usable=True)
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
                   "PATH": "/bin"}
    assert environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"  # not changed in place
    assert hostmem.tuned_environ({}, glibc=(2, 35), thp_usable=True) == {
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


@pytest.mark.parametrize("environ, glibc, thp", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), True),  # the user's choice
    ({"GLIBC_TUNABLES": "a=1:glibc.malloc.hugetlb=1"}, (2, 36), True),  # already in force
    ({"JAXPEFT_TUNE_MALLOC": "0"}, (2, 36), True),  # opted out
    ({}, (2, 31), True),  # glibc without the tunable
    ({}, (2, 36), False),  # transparent huge pages off
])
def test_tuned_environ_is_none_where_it_cannot_help_or_is_decided(environ, glibc, thp):
    assert hostmem.tuned_environ(environ, glibc=glibc, thp_usable=thp) is None


def test_tuned_environ_is_none_without_glibc(monkeypatch):
    monkeypatch.setattr(hostmem.platform, "libc_ver", lambda: ("", ""))  # musl, say
    assert hostmem.tuned_environ({}, thp_usable=True) is None


@pytest.mark.parametrize("setting, usable", [
    ("always [madvise] never\n", True), ("[always] madvise never\n", True),
    ("always madvise [never]\n", False)])
def test_transparent_huge_page_setting_is_read(tmp_path, setting, usable):
    path = tmp_path / "enabled"
    path.write_text(setting)
    assert hostmem._thp_usable(str(path)) is usable
    assert hostmem._thp_usable(str(tmp_path / "missing")) is False


def _run(program: str, *args, stdin: str = "", **env):
    environ = {**_unset_environ(), **env}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(program), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=environ)
    out, err = proc.communicate(stdin, timeout=120)
    assert proc.returncode == 0, err
    return proc.pid, out.splitlines()


RESTARTING = """
    import os, sys
    from jaxpeft import hostmem
    hostmem.restart_with_tuned_malloc()
    print(os.getpid(), sys.argv[1:], os.environ.get("GLIBC_TUNABLES", ""), sys.stdin.read())
"""


@NEEDS_RESTART
def test_restart_keeps_pid_arguments_and_stdin_and_runs_the_rest_once():
    # Standard input too: `predict --input=-` reads it after the restart.
    pid, lines = _run(RESTARTING, "an argument", "--flag=x y", stdin="piped text")
    assert lines == [f"{pid} ['an argument', '--flag=x y'] glibc.malloc.hugetlb=1 piped text"]
    pid, lines = _run(RESTARTING, "a", stdin="t", JAXPEFT_TUNE_MALLOC="0")
    assert lines == [f"{pid} ['a']  t"]


# Faults while a worker thread fills a fresh 256 MiB malloc block: the case of XLA's scratch
# buffer (glibc maps a thread's large allocation anew each time). Plain malloc, not numpy:
# numpy advises huge pages for its large arrays itself.
FAULTS = """
    import ctypes, resource, threading
    from jaxpeft import hostmem
    hostmem.restart_with_tuned_malloc()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    faults = []
    def fill():
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        block = libc.malloc(256 << 20)
        ctypes.memset(block, 1, 256 << 20)
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
        libc.free(block)
    for _ in range(3):
        t = threading.Thread(target=fill)
        t.start()
        t.join()
    print(min(faults))
"""


@NEEDS_RESTART
def test_tuned_malloc_backs_large_thread_allocations_with_huge_pages():
    pages = (256 << 20) // 4096
    _, (untuned,) = _run(FAULTS, JAXPEFT_TUNE_MALLOC="0")
    _, (tuned,) = _run(FAULTS)
    assert int(untuned) >= 0.9 * pages  # every 4-KiB page faulted in
    # 2-MiB pages: 128 faults where nothing falls back to small pages; allow for some that do.
    assert int(tuned) < pages / 8, (tuned, untuned)


def test_untuned_setting_reaches_children_and_is_described(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(hostmem.OPT_OUT, raising=False)
    assert hostmem.use_tuned_malloc(False) == "default"
    assert os.environ[hostmem.OPT_OUT] == "0"  # a jaxpeft command started now keeps glibc's
    assert hostmem.tuned_environ(os.environ, glibc=(2, 36), thp_usable=True) is None
    assert hostmem.describe({"GLIBC_TUNABLES": "a=1:glibc.malloc.hugetlb=1"}) == \
        "a=1:glibc.malloc.hugetlb=1"
    assert hostmem.describe({}) == "default"


def test_hostmem_imports_without_jax():
    # The commands restart before their other imports; that is cheap only while hostmem (and
    # the package it is in) load nothing heavy.
    _, lines = _run("import sys, jaxpeft.hostmem; print(sorted({'jax', 'flax', 'numpy'} & "
                    "set(sys.modules)))", JAXPEFT_TUNE_MALLOC="0")
    assert lines == ["[]"]


TUNED_COMMANDS = ("jaxpeft-glue", "jaxpeft-glue-suite", "jaxpeft-sweep", "jaxpeft-predict")


def test_console_scripts_restart_before_loading_jax():
    """The installed commands that run XLA steps start in `experiments` (which restarts with
    the tuning, then imports the script): loading their entry points imports no JAX, so the
    restart repeats no heavy import."""
    program = f"""
        import sys
        from importlib.metadata import entry_points
        found = {{e.name: e for e in entry_points(group="console_scripts")}}
        print([found[n].load().__module__ for n in {TUNED_COMMANDS!r}], "jax" in sys.modules)
    """
    _, (line,) = _run(program)
    assert line == f"{['experiments'] * len(TUNED_COMMANDS)} False"
