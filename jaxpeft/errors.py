"""The exception for user mistakes (bad paths, bad options, bad data), and the one for a run
stopped by a signal.

Library code raises `JaxpeftError` for anything the user can fix; the command-line scripts
catch it and print its message on one line without a traceback. Anything else is a bug and
keeps its traceback.
"""


class JaxpeftError(Exception):
    """A user-facing error: the message alone says what is wrong and how to fix it."""


class RunInterrupted(Exception):
    """A run stopped by SIGTERM or SIGINT after saving a checkpoint; `--resume` continues it.

    `signum` is the signal; scripts exit with status 128 + signum, as a killed process would.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): how a
    library's multi-line error is quoted inside one `error:` line."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
