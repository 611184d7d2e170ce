"""The command-line runner every `experiments/` script uses.

`run_command(work)` turns what a user can cause into one line and an exit status: a
`JaxpeftError` is `error: <message>` and status 1, a run stopped by a signal says how to
continue and exits with 128 + the signal, a full disk is one line. Anything else is a bug and
keeps its traceback. `start(main, module)` is absl's `app.run` with flags parsed the same way
(a bad flag is one `error:` line; `--help` lists the script's flags and exits 0), and the
process's host malloc policy (`--host_malloc`, `jaxpeft.hostmem`) applied before any work.
"""

from __future__ import annotations

import errno
import functools
import logging
import sys
from typing import Callable, Optional

from absl import flags

from jaxpeft import hostmem
from jaxpeft.errors import JaxpeftError, RunInterrupted

flags.DEFINE_enum("host_malloc", "keep", list(hostmem.POLICIES),
                  "keep: glibc's malloc keeps the memory each train step frees and reuses it "
                  "(faster steps, the process keeps its peak memory; jaxpeft.hostmem); "
                  "system: glibc's defaults")

HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "-?", "--helpfull", "--helpxml")


class _PlainFormatter(logging.Formatter):
    """jaxpeft's console format: the message, with `warning: ` / `error: ` before those."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"error: {text}"
        return f"warning: {text}" if record.levelno >= logging.WARNING else text


class _ConsoleHandler(logging.StreamHandler):
    """The scripts' one console handler (a class of its own, so it is installed once). It
    writes to the `sys.stderr` of the moment, which tests and tqdm may have replaced."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def cli_logging() -> None:
    """Console logging for the scripts: warnings as plain `warning:` lines (absl's glog-style
    `W1205 12:00:00 ... file.py:300]` prefix off), absl's INFO chatter off."""
    from absl import logging as absl_logging

    root = logging.getLogger()
    # absl's app.run puts its own handler on the root logger; ours replaces it.
    absl_handler = absl_logging.get_absl_handler()
    if absl_handler in root.handlers:
        root.removeHandler(absl_handler)
    if not any(isinstance(h, _ConsoleHandler) for h in root.handlers):
        handler = _ConsoleHandler(sys.stderr)
        handler.setFormatter(_PlainFormatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    # orbax and jax log every checkpoint step at INFO through absl: keep the console readable.
    absl_logging.set_verbosity(absl_logging.WARNING)


def run_command(work: Callable[[], Optional[int]], *, output_dir: str = "",
                resume_hint: str = "continue with --resume") -> int:
    """Runs `work()` for the command line and returns the exit status: `work`'s own (0 when
    it returns None), 1 for a user error, 128 + signal for a stopped run, 130 for Ctrl-C."""
    cli_logging()
    where = f" (output in {output_dir})" if output_dir else ""
    try:
        status = work()
        # Library functions return their results (a dict); only an int is an exit status.
        return status if isinstance(status, int) else 0
    except JaxpeftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RunInterrupted as e:
        print(f"{e}; {resume_hint}{where}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"interrupted; {resume_hint}{where}", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"error: no space left on device ({e.filename or output_dir}); files written "
              "before are intact; free space and continue with --resume", file=sys.stderr)
        return 1


def parse_flags(argv: list, module: str = "__main__") -> list:
    """absl's flag parsing for the scripts: a bad flag or value is one `error:` line and exit
    status 1; `--help` prints the script's docstring, the key flags of `module` and this
    runner's own (`--host_malloc`) and exits 0."""
    asked = [a for a in argv[1:] if a.split("=", 1)[0] in HELP_FLAGS]
    if asked:
        doc = (sys.modules[module].__doc__ or "").strip()
        full = asked[0].split("=", 1)[0] == "--helpfull"
        print(doc + "\n\nflags:\n" + (flags.FLAGS.get_help() if full else
                                      flags.FLAGS.module_help(module) + "\n"
                                      + flags.FLAGS.module_help(__name__)))
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def start(main: Callable[[], int], module: str) -> None:
    """Parses the flags, applies `--host_malloc` and exits with `main()`'s status; positional
    arguments are refused."""
    from absl import app

    def checked(argv):
        if len(argv) > 1:
            print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
            sys.exit(1)
        # Before main: JAX has not allocated yet, so its threads take the one arena.
        hostmem.set_policy(flags.FLAGS.host_malloc)
        sys.exit(main())

    app.run(checked, flags_parser=functools.partial(parse_flags, module=module))
