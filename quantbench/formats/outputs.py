"""Where quantbench may write, checked before any work, and how an output replaces another.

Rules (every command that writes goes through them):

- an output is never the working directory, quantbench's cache or a source (a checkpoint
  folder, a ``.gguf`` file's folder, a sample's cache), nor a folder above one, however it is
  spelled (symlinks and ``..`` resolved);
- ``--overwrite`` replaces an empty folder or a quantbench output (a ``quantbench.json``
  that is a quantbench manifest, and nothing beside the files it lists); any other folder is
  refused, naming what is in it;
- an output is written into a temporary sibling (``.NAME.tmp-<owner>-<random>``) and swapped
  in atomically (:func:`quantbench.tempfiles.exchange`; where that is missing, two renames
  with the old output parked as ``.NAME.old-<owner>-<random>``); the next run for the same
  output removes the temporaries of dead runs and puts back a parked output whose run died
  before the new one was in place;
- a report file (``--json``, ``--plot``) is not a folder, not inside a source and never a file
  of a model (weights, config, tokenizer, manifest).

An output path ending in ``.gguf`` is a GGUF written as that one file, with its manifest beside
it; :mod:`quantbench.formats.file_output` applies the same rules to files.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from quantbench import tempfiles
from quantbench.diskspace import check_free, reported
from quantbench.errors import QuantbenchError
from quantbench.faults import failpoint
from quantbench.formats.base import MANIFEST

log = logging.getLogger(__name__)

Protected = Sequence[tuple[Path, str]]  # (path, what it is) an output may not replace
MODEL_FILES = {"config.json", MANIFEST, "tokenizer.json", "tokenizer_config.json",
               "tokenizer.model", "special_tokens_map.json", "generation_config.json",
               "model.safetensors.index.json", "vocab.json", "merges.txt", "added_tokens.json"}
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


def tmp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def old_prefix(target: Path) -> str:
    return f".{target.name}.old-"


# -- what an output may not be --------------------------------------------------------------

def source_paths(source: "str | os.PathLike") -> list[tuple[Path, str]]:
    """What a source puts off limits: its folder (a ``.gguf`` file: the file's folder), or
    for ``sample:NAME`` the sample's cache."""
    text = str(source)
    if text.startswith("sample:"):
        from quantbench.models.sample import sample_dir

        return [(sample_dir(text.split(":", 1)[1]), f"the cache of {text}")]
    path = Path(text).expanduser()
    if path.is_dir():
        return [(path, "the source")]
    if path.exists():
        return [(path, "the source"), (path.parent, "the source's folder")]
    return []


def model_paths(model: Any) -> list[tuple[Path, str]]:
    """The protected paths of a loaded model: what it was given as, and where it was read."""
    return [*source_paths(model.source), (Path(model.path), "the source")]


def _working_directory() -> list[tuple[Path, str]]:
    with contextlib.suppress(OSError):  # a working directory that was deleted
        return [(Path.cwd(), "the working directory")]
    return []


def _cache() -> list[tuple[Path, str]]:
    from quantbench.models.cache import cache_root

    return [(cache_root(), "quantbench's cache")]


def _resolve(path: Path, flag: str) -> Path:
    path = Path(path)
    if path.is_symlink():
        raise QuantbenchError(f"{flag} {path} is a symbolic link (to {os.readlink(path)}); "
                              "pass the real path of a new directory")
    return path.expanduser().resolve()


def _check_not_protected(out: Path, target: Path, protect: Iterable[tuple[Path, str]],
                         flag: str, todo: str = "choose a new directory") -> None:
    for path, what in [*_working_directory(), *protect, *_cache()]:
        real = Path(path).expanduser().resolve()
        if target == real or target in real.parents:
            relation = "is" if target == real else "contains"
            raise QuantbenchError(f"{flag} {out} {relation} {what} ({real}); writing it would "
                                  f"replace that: {todo}")


# -- is this folder quantbench's to replace? --------------------------------------------------

def _manifest_files(directory: Path) -> set[str] | None:
    """The files a quantbench manifest in ``directory`` lists; None when there is none or
    ``quantbench.json`` is not one."""
    return listed_files(directory / MANIFEST)


def listed_files(manifest: Path) -> set[str] | None:
    """The files the quantbench manifest ``manifest`` lists; None when it is missing or not a
    quantbench manifest."""
    try:
        data = json.loads(Path(manifest).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("tool"), dict) or \
            data["tool"].get("name") != "quantbench" or not isinstance(data.get("files"), dict):
        return None
    return set(data["files"])


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    more = f", ... ({len(names)} entries)" if len(names) > 5 else \
        f" ({len(names)} entr{'y' if len(names) == 1 else 'ies'})"
    return shown + more


def _check_replaceable(out: Path, target: Path) -> None:
    """``--overwrite`` on a non-empty folder: only a quantbench output, nothing else in it."""
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in target.iterdir())
    listed = _manifest_files(target)
    if listed is None:
        raise QuantbenchError(f"output {out} is not a quantbench output (no quantbench manifest) "
                              f"and holds {_listing(entries)}; --overwrite only replaces a "
                              "quantbench output: choose another path or empty it yourself")
    ours = listed | {MANIFEST}
    foreign = [e for e in entries if e not in ours and
               not e.startswith(f".{MANIFEST}.tmp-")]  # a dead run's manifest rewrite
    if foreign:
        raise QuantbenchError(f"output {out} holds files quantbench did not write: "
                              f"{_listing(foreign)}; --overwrite would delete them: move them "
                              "out or choose another path")


def check_output(out: "str | os.PathLike", overwrite: bool = False,
                 protect: Protected = (), flag: str = "output") -> Path:
    """Refuse an output directory that cannot or may not be written, before any work; return
    it resolved. A previous output a killed run left parked is put back first. (A path ending
    in ``.gguf`` names a file: ``formats/io.py`` ``check_output`` sends it to
    ``formats/file_output.py``.)"""
    out = Path(out)
    target = _resolve(out, flag)
    _check_not_protected(out, target, protect, flag)
    recover_output(target)
    if target.exists() and not target.is_dir():
        raise QuantbenchError(f"{flag} {out} exists and is not a directory; choose another path")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise QuantbenchError(f"{flag} {out} already exists and is not empty; pass "
                                  "--overwrite")
        _check_replaceable(out, target)
    check_writable_parent(target)
    return target


def check_writable_parent(target: Path) -> None:
    """The nearest existing folder above ``target`` can take new entries."""
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise QuantbenchError(f"cannot write to {parent}; choose a writable output path")


# -- writing and replacing ------------------------------------------------------------------

def recover_output(target: Path) -> None:
    """Clean up after dead runs writing ``target``: their temporaries go; a previous output
    they had parked aside (killed between the two renames) comes back when ``target`` is
    missing, else goes."""
    parent = target.parent
    with contextlib.suppress(OSError):  # an unwritable parent is refused after this
        tempfiles.sweep(parent, tmp_prefix(target))
        parked = tempfiles.stale(parent, old_prefix(target))
        if parked and not os.path.lexists(target):
            newest = max(parked, key=lambda p: p.stat().st_mtime)
            os.rename(newest, target)
            parked.remove(newest)
            log.warning("restored %s, which a killed run had moved aside", target)
        for path in parked:
            tempfiles.remove(path)


def _install(tmp: Path, target: Path) -> None:
    """``tmp`` becomes ``target``; a previous ``target`` is never missing when this is cut
    short (atomic exchange; else parked under a name the next run restores)."""
    if not target.exists():
        os.rename(tmp, target)
        return
    if tempfiles.exchange(tmp, target):
        failpoint("replace-output")
        tempfiles.remove(tmp)  # now the previous output
        return
    old = target.parent / tempfiles.temp_name(old_prefix(target))
    os.rename(target, old)
    failpoint("replace-output")
    os.rename(tmp, target)
    tempfiles.remove(old)


@contextlib.contextmanager
def atomic_output_dir(out: "str | os.PathLike", overwrite: bool = False,
                      protect: Protected = (), needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``out``, on failure it is
    removed, so no partial output is ever left behind. A full disk or a refused write on the
    way is one line naming ``out`` (``needed``: the bytes it was expected to take)."""
    out = Path(out)
    target = check_output(out, overwrite, protect)
    with reported(out, needed, "free some space or choose another output path"):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfiles.make_dir(target.parent, tmp_prefix(target))
    try:
        with reported(out, needed, "free some space or choose another output path"):
            yield tmp
            tempfiles.publish(tmp)
            _install(tmp, target)
    except BaseException:
        tempfiles.remove(tmp)
        raise


# -- how big an output will be ----------------------------------------------------------------

def estimate_output_bytes(qmodel, fmt) -> int:
    """About how many bytes writing ``qmodel`` in format ``fmt`` takes: each quantized weight
    at its grid's nominal width plus half a bit (scales and zero-points) — at its source dtype
    in a format that writes weights dequantized —, other tensors as stored, the tokenizer
    files as they are."""
    model = qmodel.source
    targets = set(qmodel.targets) if fmt.stores_codes else set()
    code_bits = float(qmodel.config.grid.bits) + 0.5
    total = sum(path.stat().st_size for path in model.aux_files())
    for name in model.weights.names():
        numel = math.prod(model.weights.shape(name))
        total += numel * code_bits / 8 if name in targets else \
            numel * model.weights.dtype(name).itemsize
    return int(total)


def check_output_space(out: Path, qmodel, fmt) -> None:
    """Refuse before quantizing when the output cannot fit where it goes."""
    check_free(Path(out).absolute().parent, estimate_output_bytes(qmodel, fmt),
               f"the output {out}")


# -- report files -----------------------------------------------------------------------------

def _model_file(path: Path) -> bool:
    """A file a checkpoint or artifact folder needs (weights, config, tokenizer, manifest)."""
    if not path.is_file():
        return False
    folder = path.parent
    in_model = (folder / "config.json").is_file() or (folder / MANIFEST).is_file()
    sidecar = path.name.endswith(f".{MANIFEST}")  # NAME.gguf.quantbench.json
    return path.suffix in WEIGHT_SUFFIXES or sidecar or (in_model and (
        path.name in MODEL_FILES or path.name in (_manifest_files(folder) or ())))


def check_report_path(path: "str | os.PathLike | None", flag: str = "--json",
                      sources: Sequence[str] = (), outputs: Sequence[Path] = ()) -> None:
    """Refuse a report path that would replace something it must not: a folder, a source
    file or any existing file in a source folder, a file of a model, the output being written.
    A new file may go anywhere writable (beside or inside a source too)."""
    if not path:
        return
    path = Path(path)
    if path.is_dir():
        raise QuantbenchError(f"{flag} {path} is a directory; name a file to write")
    target = path.expanduser().resolve()
    for source in sources:
        for root, what in source_paths(source):
            real = Path(root).expanduser().resolve()
            inside = real.is_dir() and real in target.parents and what != "the source's folder"
            if target == real or (inside and target.exists()):
                raise QuantbenchError(f"{flag} {path} would replace a file of {what} ({real}); "
                                      "write reports elsewhere")
    for out in outputs:
        written = Path(out).expanduser().resolve()
        if target == written:
            raise QuantbenchError(f"{flag} {path} is the output "
                                  f"{'file' if written.suffix == '.gguf' else 'directory'}; "
                                  "name another file")
        if written.suffix == ".gguf" and target.name.startswith(f"{written.name}.") and \
                target.parent == written.parent:  # the sidecar manifest, a side file
            raise QuantbenchError(f"{flag} {path} is a file of the output {out}; name "
                                  "another file")
    if _model_file(target):
        raise QuantbenchError(f"{flag} {path} would replace a file of the model in "
                              f"{target.parent}; name another file")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QuantbenchError(f"cannot write {flag} {path}: {parent} is not writable; choose "
                              "another path")
