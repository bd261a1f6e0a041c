"""Reading the small files a user hands quantbench (config.json, quantbench.json, a recipe, an
eval text, ...), with one line for every way such a file can be unusable: missing, a directory,
unreadable (permissions), not UTF-8 text, not JSON, or JSON that is not an object.

Each reader takes the error class to raise (``ModelLoadError`` for a source, ``FormatError``
for an artifact, ``ConfigError`` for a setting) and ``hint``, what the user should do about a
damaged file, so the message says where the file belongs as well as what is wrong with it.
"""
from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

from quantbench.jsonfile import loads_strict
from quantbench.errors import QuantbenchError

__all__ = ["json_kind", "os_error_message", "read_bytes", "read_json_object", "read_text"]


def os_error_message(path: "Path | str", exc: OSError, action: str = "read") -> str:
    """``cannot read X: permission denied; check ...``: what failed and what to do about it,
    for the errors a user's file system causes (not for a full disk: that names its space)."""
    why = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.EISDIR: "it is a directory", errno.ENOTDIR: "a part of the path is not a "
           "directory", errno.ENOENT: "it does not exist"}.get(exc.errno)
    todo = {errno.EACCES: "check its permissions (and those of the folders above it)",
            errno.EPERM: "check its permissions (and those of the folders above it)",
            errno.EISDIR: "pass a file", errno.ENOTDIR: "check the path",
            errno.ENOENT: "check the path"}.get(exc.errno, "check the path and retry")
    return f"cannot {action} {path}: {why or exc.strerror or exc}; {todo}"


def read_bytes(path: Path, error: type[QuantbenchError], hint: str) -> bytes:
    """The file's bytes, or ``error`` saying why it cannot be read."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{path} is a directory, not a file; {hint}")
    if not path.exists():
        raise error(f"{path} does not exist; {hint}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise error(os_error_message(path, exc)) from exc


def read_text(path: Path, error: type[QuantbenchError], hint: str) -> str:
    """The file as UTF-8 text; binary content (not UTF-8, or NUL bytes) is refused."""
    data = read_bytes(path, error, hint)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text (byte {exc.start} is not); {hint}") from exc
    if "\x00" in text:
        raise error(f"{path} holds NUL bytes (binary data, not text); {hint}")
    return text


def json_kind(value: Any) -> str:
    """How a message names a JSON value's type: ``an object``, ``a list``, ``null`` ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    return {dict: "an object", list: "a list", str: "a string", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def read_json_object(path: Path, error: type[QuantbenchError], hint: str) -> dict[str, Any]:
    """The JSON object a file holds; anything else (unreadable, not JSON, a list, a string,
    a number, null) is ``error`` naming the file and ending with ``hint``."""
    text = read_text(path, error, hint)
    try:  # strict: a bare NaN/Infinity is not JSON (and could not be written back)
        data = loads_strict(text)
    except ValueError as exc:
        raise error(f"{path} is not valid JSON ({exc}); {hint}") from exc
    if not isinstance(data, dict):
        raise error(f"{path} holds {json_kind(data)}, not a JSON object; {hint}")
    return data
