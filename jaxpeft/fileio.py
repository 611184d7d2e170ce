"""Reading a user's text files with one clear error, and atomic writes: a file is either
absent, old, or complete — never half-written.

`read_text` names the file (and the line of a bad byte) for every way a text file can fail to
read. The atomic writes serve the adapter files and the run writer, so an interrupted run never
leaves a truncated JSON or weights file behind.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, os.PathLike]


def read_text(path: PathLike, what: str = "file") -> str:
    """The UTF-8 text of `path` (`-`: standard input; a byte-order mark dropped). A missing
    file, a folder, a link loop, no permission or a non-UTF-8 byte is a `JaxpeftError` naming
    the file (and the line of the byte); `what` says what the file was meant to be."""
    from jaxpeft.errors import JaxpeftError

    name = "<stdin>" if os.fspath(path) == "-" else os.fspath(path)
    try:
        data = sys.stdin.buffer.read() if name == "<stdin>" else Path(path).read_bytes()
    except FileNotFoundError:
        raise JaxpeftError(f"{name}: {what} not found") from None
    except IsADirectoryError:
        raise JaxpeftError(f"{name}: is a folder, expected a {what}") from None
    except OSError as e:
        raise JaxpeftError(f"{name}: cannot read the {what} ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise JaxpeftError(f"{name}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); the "
                           f"{what} must be UTF-8") from None


def read_json_object(path: PathLike, what: str = "JSON file") -> dict:
    """The JSON object in `path`; unreadable text, invalid JSON or another JSON value (a list,
    a number) is a `JaxpeftError` naming the file."""
    import json as _json

    from jaxpeft.errors import JaxpeftError

    text = read_text(path, what)
    try:
        value = _json.loads(text)
    except ValueError as e:
        raise JaxpeftError(f"{path}: the {what} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise JaxpeftError(f"{path}: the {what} is not a JSON object (found "
                           f"{type(value).__name__})")
    return value


def read_safetensors_file(path: PathLike) -> dict:
    """All tensors of one safetensors file as numpy arrays; a missing, truncated or damaged
    file is a `JaxpeftError` naming it."""
    from safetensors.numpy import load_file

    from jaxpeft.errors import JaxpeftError, first_line

    try:
        return load_file(os.fspath(path))
    except Exception as e:  # SafetensorError, OSError: a truncated, damaged or missing file
        raise JaxpeftError(f"{path}: not a readable safetensors file ({first_line(e)})") from None


def _read_umask() -> int:
    # Setting and restoring os.umask would race with threads creating files (orbax writes
    # from threads), so read it where Linux shows it.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return _UMASK_AT_IMPORT


def _umask_at_import() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_at_import()


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path`, fsyncs it, then renames it over.

    The file gets the permissions a plain `open(path, "w")` would give (0666 less the
    umask), not `mkstemp`'s private 0600, so other users of a shared machine can read runs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_read_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Atomically writes `obj` as indented JSON (NaN/inf are refused: they are not JSON)."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
