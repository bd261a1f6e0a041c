"""A full disk or a refused write, told as one line: where, roughly how much space is needed,
what to do. :func:`check_free` refuses a write whose size is known before it starts;
:func:`reported` turns the errors of one that fails on the way into a ``QuantbenchError``."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

from quantbench.errors import QuantbenchError

class DiskError(QuantbenchError):
    """A write the disk refused (full, quota, permission, read-only); ``__cause__`` holds the
    OS error, so an enclosing :func:`reported` can name its own, user-facing path instead."""


NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
REFUSED = {errno.EACCES, errno.EPERM, errno.EROFS}
TOO_BIG = {errno.EFBIG}
BAD_PATH = {errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENOENT}


def human(n: float) -> str:
    """Bytes in the unit that keeps a digit before the point: 3.2 GB, 41.0 MB, 12.0 kB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (where its bytes will land)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(existing(path)).free
    except OSError:
        return None


def check_free(path: Path, needed: int, what: str) -> None:
    """Refuse before any work when ``what`` (about ``needed`` bytes) cannot fit at ``path``."""
    free = free_bytes(path)
    if free is not None and needed > free:
        raise QuantbenchError(f"{what} needs about {human(needed)} at {existing(path)}, "
                              f"{human(free)} free; free some space or choose another path")


def errno_of(exc: BaseException) -> int | None:
    """The OS error behind ``exc``: its errno, the ``(os error N)`` that safetensors' Rust
    errors carry, or ENOSPC for a short write (numpy's ``tofile``: "N requested and M
    written", which only a full disk or quota causes)."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    text = str(exc)
    match = re.search(r"os error (\d+)", text)
    if match:
        return int(match.group(1))
    if isinstance(exc, OSError) and re.search(r"\d+ requested and \d+ written", text):
        return errno.ENOSPC
    return None


def write_error(exc: BaseException, where: Path,
                needed: "int | Callable[[], int | None] | None" = None,
                hint: str = "free some space or choose another path") -> DiskError | None:
    """The one-line error for a write into ``where`` that failed with ``exc``; None when
    ``exc`` is not a disk-full, permission or file-size error (a bug: let it surface).
    ``needed`` (bytes, or a function computing them only when the disk is full) is quoted."""
    code = errno_of(exc)
    if code in NO_SPACE:
        if callable(needed):
            needed = needed()
        why = "disk quota exceeded" if code == errno.EDQUOT else "no space left on the device"
        free = free_bytes(where)
        size = f"needs about {human(needed)}, " if needed else ""
        have = f"{human(free)} free" if free is not None else "free space unknown"
        return DiskError(f"{why} writing {where} ({size}{have}); {hint}")
    if code == errno.EROFS:
        return DiskError(f"cannot write {where}: the file system is read-only; choose another "
                         "path")
    if code in REFUSED:
        return DiskError(f"permission denied writing {where}; choose a writable path or fix "
                         f"the permissions of {existing(Path(where).parent)}")
    if code in TOO_BIG:
        return DiskError(f"the file system at {where} cannot hold a file this large; choose "
                         "another path")
    if code in BAD_PATH:  # a folder that vanished or is a file, a name too long
        what = exc.filename if isinstance(exc, OSError) else None
        return DiskError(f"cannot write {where} ({os.strerror(code)}"
                         + (f": {what})" if what else ")") + "; choose another path")
    return None


@contextlib.contextmanager
def reported(where: Path, needed: "int | Callable[[], int | None] | None" = None,
             hint: str = "free some space or choose another path") -> Iterator[None]:
    """Run a write into ``where``; a full disk or a refused write leaves as one line. Nested,
    the outermost names the path (a file inside an output's hidden temporary folder is told
    as the output)."""
    try:
        yield
    except DiskError as exc:
        cause = exc.__cause__
        error = write_error(cause, where, needed, hint) if cause is not None else None
        if error is None:
            raise
        raise error from cause
    except QuantbenchError:
        raise
    except Exception as exc:  # OSError, and safetensors' own error type around one
        error = write_error(exc, where, needed, hint)
        if error is None:
            raise
        raise error from exc
