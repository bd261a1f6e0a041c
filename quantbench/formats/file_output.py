"""``-o NAME.gguf``: an output that is one file, as llama.cpp's tools and their users expect
(``llama-quantize in.gguf out.gguf``), with quantbench's manifest beside it.

Every file of such an output starts with its name:

- ``NAME.gguf``: the GGUF, byte for byte what the directory layout (``-o DIR``) holds as
  ``DIR/model.gguf``;
- ``NAME.gguf.quantbench.json``: its manifest (the sidecar), the directory layout's
  ``quantbench.json`` with ``NAME.gguf`` in its ``files`` table;
- ``NAME.gguf.<file>``: a method's side files (``NAME.gguf.imatrix.gguf``: the importance a
  calibrated run used), listed in the manifest too.

Only the GGUF format writes one; a path ending in ``.gguf`` with another format is refused. The
rules of :mod:`quantbench.formats.outputs` hold, for files:

- the files are written in a staging folder beside the output (``.NAME.gguf.tmp-<owner>-<rnd>``,
  swept like any temporary) and renamed into place once all are complete: side files, then the
  GGUF, then the sidecar. The sidecar goes last, so it never vouches for a file that is missing
  or partial; a crash between the renames leaves new files beside the previous sidecar (or none),
  which verification refuses by their size and sha256 (a GGUF never looks verified when it is
  not), and the next run for the output finishes the install the dead run began (its staging
  folder holds the rest, sidecar included, which says the files were complete);
- ``--overwrite`` replaces a quantbench output (the sidecar is a quantbench manifest listing the
  file) or a GGUF another tool wrote: the user named that one file and asked for it to be
  replaced, as ``llama-quantize`` replaces its output. Never a file that is not a GGUF, a folder,
  a sidecar name held by anything but that file's manifest, or a file beside it whose name a new
  side file would take;
- the output is never the source, nor an existing file inside a source folder or the cache.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Iterator

from quantbench import tempfiles
from quantbench.diskspace import reported
from quantbench.errors import QuantbenchError
from quantbench.faults import failpoint
from quantbench.formats.base import GGUF_FILE, MANIFEST, sidecar_path
from quantbench.formats.outputs import (Protected, _cache, _check_not_protected, _resolve,
                                        atomic_output_dir, check_writable_parent, listed_files,
                                        tmp_prefix)

log = logging.getLogger(__name__)

SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"
_HINT = "free some space or choose another output path"


def is_file_output(out: str | os.PathLike) -> bool:
    """An output path naming a GGUF file rather than a directory."""
    return Path(out).suffix == SUFFIX


def check_output_format(out: str | os.PathLike, fmt: str) -> None:
    """Refuse ``-o NAME.gguf`` with a format that writes a directory, before any work."""
    if is_file_output(out) and fmt != "gguf":
        raise QuantbenchError(f"-o {out} names a GGUF file, but --format {fmt} writes a "
                              "directory; pass --type (Q4_K_M, Q8_0, ...) or --format gguf to "
                              "write a GGUF file, or an output name without .gguf")


@dataclass(frozen=True)
class Layout:
    """The names an output's files get: inside a directory (``model.gguf``,
    ``quantbench.json``, side files as named) or beside one ``.gguf`` file (module doc)."""

    out: Path
    single_file: bool

    @classmethod
    def of(cls, out: str | os.PathLike, fmt: str) -> Layout:
        check_output_format(out, fmt)
        return cls(Path(out), is_file_output(out))

    @property
    def gguf_name(self) -> str:
        return self.out.name if self.single_file else GGUF_FILE

    @property
    def manifest_name(self) -> str:
        return sidecar_path(self.out).name if self.single_file else MANIFEST

    def side_name(self, name: str) -> str:
        return f"{self.out.name}.{name}" if self.single_file else name

    def writing(self, overwrite: bool, protect: Protected, needed: int | None
                ) -> ContextManager[Path]:
        """The folder to write the files in (by the names above), installed on success."""
        if self.single_file:
            return atomic_output_file(self.out, overwrite, protect, needed)
        return atomic_output_dir(self.out, overwrite, protect, needed)


# -- may it be written? -----------------------------------------------------------------------

def check_file_output(out: str | os.PathLike, overwrite: bool = False,
                      protect: Protected = (), flag: str = "output") -> Path:
    """Refuse a ``.gguf`` output that cannot or may not be written (module doc), before any
    work; return it resolved. What a killed run left for it is settled first."""
    out = Path(out)
    target = _resolve(out, flag)
    sidecar = sidecar_path(target)
    _check_not_protected(out, target, protect, flag, "choose another path")
    _check_outside_sources(out, (target, sidecar), protect, flag)
    recover_file_output(target)
    _check_sidecar(sidecar, target)
    _check_existing(out, target, sidecar, overwrite, flag)
    check_writable_parent(target)
    return target


def _check_outside_sources(out: Path, paths: tuple[Path, ...], protect: Protected,
                           flag: str) -> None:
    """No existing file of a source folder (a checkpoint, a sample's cache) or of the cache is
    replaced; a GGUF source's folder is the user's own, where ``out.gguf`` beside ``in.gguf``
    is what llama.cpp users write."""
    for path, what in [*protect, *_cache()]:
        real = Path(path).expanduser().resolve()
        if what == "the source's folder" or not real.is_dir():
            continue
        for file in paths:
            if os.path.lexists(file) and real in file.parents:
                raise QuantbenchError(f"{flag} {out} would replace {file.name}, a file of {what} "
                                      f"({real}); choose another path")


def _check_sidecar(sidecar: Path, target: Path) -> None:
    if not os.path.lexists(sidecar):
        return
    if sidecar.is_symlink() or not sidecar.is_file() or \
            target.name not in (listed_files(sidecar) or ()):
        raise QuantbenchError(f"{sidecar} exists and is not quantbench's manifest of "
                              f"{target.name}; the output's manifest would replace it: move it "
                              "away or choose another output name")


def _check_existing(out: Path, target: Path, sidecar: Path, overwrite: bool, flag: str) -> None:
    if target.is_dir():
        raise QuantbenchError(f"{flag} {out} is a directory, and -o NAME.gguf writes one GGUF "
                              "file; move the directory away or choose another name")
    exists = os.path.lexists(target)
    if not exists and not os.path.lexists(sidecar):
        return
    if not overwrite:
        what = "" if exists else f"'s manifest {sidecar.name}"
        raise QuantbenchError(f"{flag} {out}{what} already exists; pass --overwrite")
    if not exists or os.path.lexists(sidecar):  # the sidecar lists it: a quantbench output
        return
    if not target.is_file() or not _is_gguf(target):
        raise QuantbenchError(f"{flag} {out} exists and is not a GGUF file; --overwrite only "
                              "replaces a GGUF file or a quantbench output: choose another path")
    log.info("%s: a GGUF quantbench did not write (no %s); --overwrite replaces it", out,
             sidecar.name)


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def _own_files(sidecar: Path, target: Path) -> set[str]:
    """The side files the manifest ``sidecar`` lists for ``target`` (plain names beside it)."""
    return {name for name in listed_files(sidecar) or () if _side_file(name, target)}


def _side_file(name: str, target: Path) -> bool:
    return name.startswith(f"{target.name}.") and "/" not in name and "\\" not in name \
        and "\0" not in name


# -- writing, installing, settling ------------------------------------------------------------

@contextlib.contextmanager
def atomic_output_file(out: str | os.PathLike, overwrite: bool = False,
                       protect: Protected = (), needed: int | None = None) -> Iterator[Path]:
    """Yield a staging folder beside ``out`` to write the output's files in, by their final
    names (:class:`Layout`), the sidecar last; on success they are renamed into place, on
    failure removed, so nothing partial is left. A full disk or a refused write is one line
    naming ``out`` (``needed``: the bytes it was expected to take)."""
    out = Path(out)
    target = check_file_output(out, overwrite, protect)
    with reported(out, needed, _HINT):
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = tempfiles.make_dir(target.parent, tmp_prefix(target))
    try:
        with reported(out, needed, _HINT):
            yield staging
            listed = _staged(staging, target)
            if listed is None:
                raise RuntimeError(f"{staging}: no {sidecar_path(target).name} was written")
            check_file_output(out, overwrite, protect)  # nothing took its names meanwhile
            _check_side_files(target, listed)
            _install(staging, target, listed)
    except BaseException:
        with contextlib.suppress(OSError):
            _settle(staging, target)
        raise
    tempfiles.remove(staging)


def _staged(staging: Path, target: Path) -> list[str] | None:
    """The files the staged sidecar lists (None until it is written: it is written last)."""
    listed = listed_files(staging / sidecar_path(target).name)
    if listed is None:
        return None
    return sorted(n for n in listed if n == target.name or _side_file(n, target))


def _check_side_files(target: Path, listed: list[str]) -> None:
    """A new side file never replaces a file beside the output that is not the previous
    output's own."""
    ours = _own_files(sidecar_path(target), target)
    for name in listed:
        if name != target.name and os.path.lexists(target.parent / name) and name not in ours:
            raise QuantbenchError(f"{target.parent / name} exists and is not a file of the "
                                  f"output {target.name} (its manifest does not list it); the "
                                  "output's file of that name would replace it: move it away")


def _install(staging: Path, target: Path, listed: list[str]) -> None:
    """Rename the staged files into place: side files, the GGUF, the sidecar last; then remove
    the previous output's side files that the new manifest does not list."""
    sidecar = sidecar_path(target)
    previous = _own_files(sidecar, target) - set(listed)
    for name in sorted(listed, key=lambda n: n == target.name):  # the GGUF after side files
        if os.path.lexists(staging / name):
            os.replace(staging / name, target.parent / name)
    failpoint("install-file")
    os.replace(staging / sidecar.name, sidecar)
    for name in previous:
        (target.parent / name).unlink(missing_ok=True)


def _settle(staging: Path, target: Path) -> None:
    """A staging folder no run will finish: an install it had begun is completed (its sidecar
    was written, so the files it lists were complete, and some are already in place); anything
    else is removed."""
    listed = _staged(staging, target)
    if listed is not None and any(not os.path.lexists(staging / n) for n in listed):
        _install(staging, target, listed)
        log.warning("finished installing %s, which a stopped run had begun", target)
    tempfiles.remove(staging)


def recover_file_output(target: Path) -> None:
    """Settle the staging folders of dead runs writing ``target``."""
    with contextlib.suppress(OSError):  # an unwritable folder is refused after this
        for staging in tempfiles.stale(target.parent, tmp_prefix(target)):
            _settle(staging, target)
