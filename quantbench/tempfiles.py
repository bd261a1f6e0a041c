"""Temporary files and folders a later run can recognise and clean up.

Every temporary path quantbench makes is ``PREFIX + OWNER + "-" + random``, where ``PREFIX``
names what it stands for (``.out.tmp-`` for an output being written beside ``out``) and
``OWNER`` is the process: ``pid.starttime`` (the start time from ``/proc``, so a recycled pid
is not taken for the dead owner), or ``pid`` alone where ``/proc`` is missing. A run killed at
any point leaves such names behind; the next run for the same output or cache entry calls
:func:`sweep` with the same prefix and removes those whose owner is gone, and never touches a
live process's temporaries or a name it did not make.

:func:`exchange` swaps two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so a
replaced output is never missing, not even for a moment.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
from pathlib import Path

_OWNER = re.compile(r"(\d+)(?:\.(\d+))?-[A-Za-z0-9_]+")


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """``(state, start time)`` of a process from ``/proc/PID/stat``; None when unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()  # after "pid (comm) ": state is field 3
    return fields[0].decode(), fields[19].decode()  # starttime is field 22


def owner_tag() -> str:
    """This process as it appears in temporary names (``pid.starttime``)."""
    pid = os.getpid()
    stat = _proc_stat(pid)
    return f"{pid}.{stat[1]}" if stat else str(pid)


def temp_name(prefix: str) -> str:
    return f"{prefix}{owner_tag()}-{secrets.token_hex(4)}"


def make_dir(folder: Path, prefix: str) -> Path:
    """A new, empty, private folder ``folder/PREFIX<owner>-<random>``."""
    while True:
        path = Path(folder) / temp_name(prefix)
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue


def make_file(folder: Path, prefix: str) -> tuple[int, Path]:
    """A new, empty, private file ``folder/PREFIX<owner>-<random>``: ``(fd, path)``."""
    while True:
        path = Path(folder) / temp_name(prefix)
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), path
        except FileExistsError:
            continue


def umask() -> int:
    """The process's umask, read without changing it where /proc tells it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (no threads of ours are writing now)
    os.umask(mask)
    return mask


def publish(path: Path) -> None:
    """Give a finished temporary (private while built) the mode a plain ``mkdir``/``open``
    would have given it under the user's umask, before it is renamed into place: a released
    model on a shared machine is as readable as any file the user writes."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~umask())


def _alive(pid: int, start: str | None) -> bool:
    stat = _proc_stat(pid)
    if stat is not None:
        return stat[0] != "Z" and (start is None or stat[1] == start)
    if os.path.exists("/proc/self/stat"):
        return False  # /proc works and has no such process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def is_stale(path: Path, prefix: str) -> bool:
    """``path`` is one of ours for ``prefix`` and the process that made it is gone."""
    name = Path(path).name
    if not name.startswith(prefix):
        return False
    match = _OWNER.fullmatch(name[len(prefix):])
    return bool(match) and not _alive(int(match.group(1)), match.group(2))


def stale(folder: Path, prefix: str) -> list[Path]:
    """The stale temporaries for ``prefix`` in ``folder`` (none when it does not exist)."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(Path(folder) / n for n in names if is_stale(Path(folder) / n, prefix))


def remove(path: Path) -> None:
    """Remove a file or a folder tree; gone already is fine (another run swept it)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep(folder: Path, prefix: str) -> list[Path]:
    """Remove the temporaries for ``prefix`` in ``folder`` left by dead processes; return them."""
    found = stale(folder, prefix)
    for path in found:
        remove(path)
    return found


@functools.lru_cache(maxsize=1)
def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (musl, old glibc, not Linux)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}


def exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically; False where the system or file system cannot (the
    caller then falls back to two renames)."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))
