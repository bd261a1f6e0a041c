"""``quantbench.json``: what was done, to which source, and the checksum of every file."""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

from quantbench import tempfiles
from quantbench.diskspace import reported
from quantbench.errors import FormatError, QuantbenchError
from quantbench.formats.base import GGUF_FILE, MANIFEST, MANIFEST_VERSION, sidecar_path
from quantbench.jsonfile import dumps

log = logging.getLogger(__name__)



def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def check_file_target(path: "Path | str", what: str = "") -> None:
    """Refuse a file to write that names an existing directory (``--json out/``), before any
    work where the caller checks it up front, else before writing."""
    path = Path(path)
    if path.is_dir():
        raise QuantbenchError(f"{what + ' ' if what else ''}{path} is a directory; name a file "
                              f"to write (inside it or elsewhere)")


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Open a fresh temporary file beside ``path``; on success it replaces ``path``, else vanishes.

    The temporary name is unique and names its process (``.NAME.tmp-<owner>-<random>``, see
    :mod:`quantbench.tempfiles`), so two writers of one path never share it and the next write
    of ``path`` removes what a killed one left; the parent folder is created; a reader sees the
    old file or the whole new one, never a part. A full disk or a refused write is one line.
    """
    path = Path(path)
    check_file_target(path)
    prefix = f".{path.name}.tmp-"
    with reported(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfiles.sweep(path.parent, prefix)
        fd, tmp = tempfiles.make_file(path.parent, prefix)
    try:
        with reported(path):
            with os.fdopen(fd, mode) as fh:
                yield fh
            tempfiles.publish(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    """``payload`` as indented JSON, atomically; a non-finite float is refused before the file
    is touched (see ``quantbench/jsonfile.py``: pass ``with_nulls(payload, ...)`` where a value
    may legitimately be missing)."""
    text = dumps(payload, what=str(path), indent=2, sort_keys=False, default=str)
    with atomic_write(path, "w") as fh:  # e.g. `--json out/report.json` creates out/
        fh.write(text + "\n")


def file_table(directory: Path) -> dict[str, dict[str, Any]]:
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }


def summarize_tensors(info: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Counts and both bits per weight (defined in ``quantbench/bits_per_weight.py``)."""
    from quantbench.bits_per_weight import summarize

    return summarize(info)


def build_manifest(directory: Path, qmodel, fmt: str, tensor_info: dict[str, dict[str, Any]],
                   write_seconds: float, command: list[str] | None = None,
                   weight_file: str = GGUF_FILE) -> dict[str, Any]:
    """The manifest of a written artifact; ``command`` (the argv of the CLI run that wrote it)
    is recorded when given, so a model card can quote it (older manifests lack the key).
    ``weight_file``: the GGUF's name (``NAME.gguf`` for ``-o NAME.gguf``), counted in the
    weights' size with the ``.safetensors`` files."""
    from quantbench import __version__

    files = file_table(directory)
    model = qmodel.source
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "tool": {"name": "quantbench", "version": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "format": fmt,
        "source": {"id": model.source, "path": str(model.path),
                   "architecture": model.config.get("model_type"),
                   "dtype": str(model.dtype).replace("torch.", ""),
                   "sample": model.meta.get("sample", {}).get("provenance")},
        "quantize": qmodel.config.to_dict(),
        "summary": {**summarize_tensors(tensor_info),
                    "size_bytes": sum(f["bytes"] for name, f in files.items()
                                      if name == weight_file or name.endswith(".safetensors")),
                    "quantize_seconds": round(qmodel.seconds, 3),
                    "quantize_device": qmodel.device,
                    "quantize_device_peak_bytes": qmodel.device_peak_bytes,
                    "write_seconds": round(write_seconds, 3)},
        "tensors": tensor_info,
        "files": files,
        "eval": None,
    }
    if command:
        manifest["command"] = [str(arg) for arg in command]
    if coverage := qmodel.expert_coverage():  # a mixture-of-experts model's calibration
        manifest["experts"] = coverage
    if kept := model.passthrough_report():  # parts copied through unquantized (vision tower);
        # a GGUF holds the text model only (llama.cpp reads the vision part from an mmproj)
        manifest["left_out" if fmt == "gguf" else "passthrough"] = kept
    return manifest


def checkpoint_manifest(directory: Path, source: str, source_path: Path,
                        config: dict[str, Any], tensor_info: dict[str, dict[str, Any]]
                        ) -> dict[str, Any]:
    """The manifest of a plain checkpoint quantbench wrote without quantizing (a GGUF's FP16
    import): what it came from and the checksum of every file, so it is known as ours."""
    from quantbench import __version__

    files = file_table(directory)
    dtypes = {info["dtype"] for info in tensor_info.values()}
    return {
        "manifest_version": MANIFEST_VERSION,
        "tool": {"name": "quantbench", "version": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "format": "dense",
        "source": {"id": source, "path": str(source_path),
                   "architecture": config.get("model_type"),
                   "dtype": dtypes.pop() if len(dtypes) == 1 else None, "sample": None},
        "quantize": None,
        "summary": {**summarize_tensors(tensor_info),
                    "size_bytes": sum(f["bytes"] for name, f in files.items()
                                      if name.endswith(".safetensors"))},
        "tensors": tensor_info,
        "files": files,
        "eval": None,
    }



# What a loader of an artifact directory reads (quantbench's readers, transformers, vLLM,
# llama.cpp, exllamav2): weights in any container, remote code, tokenizer and chat-template files
# (by a part of their name: ``tokenizer.model.v3``), and JSON / text configs and vocabularies (by
# a word of their name: ``tekken.json``, ``merges.txt``). An unlisted one is a difference like a
# changed file; any other file (notes, an eval report saved beside it, a licence, a picture,
# hidden files) is read by none, so it is not.
_LOADED_PARTS = frozenset({"safetensors", "gguf", "bin", "pt", "pth", "ckpt", "pkl", "pickle",
                           "h5", "msgpack", "npz", "npy", "onnx", "py", "model", "tiktoken",
                           "jinja"})
_LOADED_WORDS = ("config", "token", "vocab", "merges", "index", "template", "params", "tekken",
                 "measurement")
_NO_VERIFY = "pass --no-verify (verify=False in Python) to use it as it is"


@dataclass(frozen=True)
class FileProblem:
    """One file of an artifact that is not as its manifest records."""

    name: str
    why: str  # "missing", "1234 bytes, 1235 recorded", "sha256 differs", "not listed, ..."

    @property
    def unlisted(self) -> bool:
        return self.why.startswith("not listed")

    def __str__(self) -> str:
        return f"{self.name}: {self.why}"


def loadable(name: str) -> bool:
    """Whether a reader of an artifact directory may read a file of this name."""
    if name.startswith("."):
        return False
    parts = name.lower().split(".")
    if _LOADED_PARTS.intersection(parts[1:]):
        return True
    return parts[-1] in ("json", "txt") and any(word in parts[0] for word in _LOADED_WORDS)


def manifest_path(target: str | os.PathLike) -> Path | None:
    """The manifest that vouches for ``target``: ``quantbench.json`` in a directory, the sidecar
    ``NAME.gguf.quantbench.json`` beside a file (``-o NAME.gguf``), else the ``quantbench.json``
    of the directory holding a file passed directly (``out/model.gguf``); None when nothing
    vouches for it (another tool's checkpoint, a bare .gguf)."""
    path = Path(target)
    if path.is_dir():
        return path / MANIFEST if (path / MANIFEST).exists() else None
    if path.is_file():
        if sidecar_path(path).exists():
            return sidecar_path(path)
        if (path.parent / MANIFEST).exists():
            return path.parent / MANIFEST
    return None


def vouched_for(manifest: Path) -> Path:
    """What a manifest vouches for: its directory, or the file a sidecar is named after."""
    manifest = Path(manifest)
    if manifest.name == MANIFEST:
        return manifest.parent
    return manifest.with_name(manifest.name[: -len(f".{MANIFEST}")])


def load_checked_manifest(file: str | os.PathLike, todo: str | None = None) -> dict[str, Any]:
    """The manifest ``file`` (``DIR/quantbench.json`` or a sidecar) as verification needs it:
    strict JSON (no bare NaN), an object, with a ``files`` table of plain file names, each with
    its size and sha256. Anything else is refused in one line: what it vouches for is then not
    an artifact quantbench can vouch for (``todo``: what the message advises instead of
    re-converting or --no-verify)."""
    from quantbench.formats.base import read_manifest_file

    file = Path(file)
    todo = todo or f"re-convert it, or {_NO_VERIFY}"
    if file.is_dir():
        raise _unvouched(file, "is a directory, not a file", todo)
    manifest = read_manifest_file(file)  # strict JSON, an object, keys of their types
    if manifest is None:
        raise _unvouched(file, "is missing", todo)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise _unvouched(file, "has no 'files' table (each file's bytes and sha256)", todo)
    for name, entry in files.items():
        if not _plain_name(name, file.name):
            raise _unvouched(file, f"lists {name!r}, which is not a file name inside "
                                   f"{file.parent.name}", todo)
        if not _valid_entry(entry):
            raise _unvouched(file, f"files[{name!r}] is not a size in bytes and a sha256", todo)
    return manifest


def _unvouched(file: Path, problem: str, todo: str) -> FormatError:
    return FormatError(f"{file} {problem}, so {vouched_for(file)} is not a quantbench artifact "
                       f"whose files can be vouched for; {todo}")


def _plain_name(name: str, manifest: str = MANIFEST) -> bool:
    """A file directly inside the directory (never ``../x``, ``a/b`` or the manifest itself)."""
    return name not in ("", ".", "..", MANIFEST, manifest) and "/" not in name \
        and "\\" not in name and "\0" not in name


def _valid_entry(entry: Any) -> bool:
    if not isinstance(entry, dict):
        return False
    size, digest = entry.get("bytes"), entry.get("sha256")
    return isinstance(size, int) and not isinstance(size, bool) and size >= 0 and \
        isinstance(digest, str) and len(digest) == 64 and \
        all(c in "0123456789abcdef" for c in digest.lower())


def verify_files(file: str | os.PathLike, manifest: dict[str, Any]) -> list[FileProblem]:
    """Every file the manifest ``file`` (``DIR/quantbench.json`` or a sidecar) lists, with the
    recorded size and sha256 (streamed); for a directory's manifest also no file it does not list
    that a reader would load (an extra shard, a config.json beside a GGUF) — a sidecar vouches
    for its file, not for the folder around it. ``manifest`` is one :func:`load_checked_manifest`
    accepted."""
    file = Path(file)
    directory = file.parent
    listed = manifest.get("files") or {}
    problems = [FileProblem(name, why) for name, entry in listed.items()
                if (why := _file_problem(directory / name, entry)) is not None]
    if file.name != MANIFEST:
        return problems
    for path in sorted(directory.iterdir()):
        if path.name not in listed and path.name != MANIFEST and loadable(path.name) \
                and path.is_file():
            problems.append(FileProblem(path.name, "not listed, yet a loader of the directory "
                                                   "would read it"))
    return problems


def _file_problem(path: Path, entry: dict[str, Any]) -> str | None:
    if not path.is_file():
        return "missing" if not path.exists() else "not a regular file"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{size} bytes, {entry['bytes']} recorded"
    try:
        digest = sha256_file(path)
    except OSError as exc:  # not damage: the user's file system refuses (permissions)
        from quantbench.inputs import os_error_message

        raise FormatError(os_error_message(path, exc)) from exc
    return "sha256 differs" if digest != entry["sha256"].lower() else None


def mismatch_message(file: str | os.PathLike, problems: list[FileProblem]) -> str:
    """One line: the first file that differs and why, the others, and what to do (``file``:
    the manifest that records them)."""
    file = Path(file)
    first, rest = problems[0], problems[1:]
    also = "; also " + ", ".join(map(str, rest[:4])) if rest else ""
    also += f" and {len(rest) - 4} more" if len(rest) > 4 else ""
    todo = (f"move the files it does not list out of the directory, or {_NO_VERIFY}"
            if all(p.unlisted for p in problems) else f"re-convert it, or {_NO_VERIFY}")
    return f"{vouched_for(file)}: {first.name} not as {file.name} records ({first.why}{also}); " \
        f"{todo}"


def verify_artifact(target: str | os.PathLike, verify: bool = True) -> Path | None:
    """Check ``target`` against the manifest that vouches for it (:func:`manifest_path`), before
    anything reads it: a one-line ``FormatError`` naming the file that differs. Returns the
    manifest verified, or None when none vouches for ``target`` (nothing to verify) or
    ``verify`` is False (a warning says it was skipped)."""
    file = manifest_path(target)
    if file is None:
        return None
    if not verify:
        log.warning("%s: files not checked against its %s (--no-verify); used as they are",
                    vouched_for(file), file.name)
        return None
    problems = verify_files(file, load_checked_manifest(file))
    if problems:
        raise FormatError(mismatch_message(file, problems))
    return file


def record_eval(target: str | os.PathLike, summary: dict[str, Any]) -> bool:
    """Store the evaluation summary in the manifest that vouches for ``target`` (other fields
    untouched) — only when its files verify now: an evaluation of other bytes than the manifest
    records is never written into it (a warning says so, --no-verify or not). Returns whether
    it was recorded."""
    file = manifest_path(target)
    if file is None:
        return False
    try:
        manifest = load_checked_manifest(file)
    except FormatError as exc:
        log.warning("evaluation not recorded: %s", exc)
        return False
    problems = verify_files(file, manifest)
    if problems:
        log.warning("%s: evaluation not recorded in its %s: its files do not match it (%s)",
                    vouched_for(file), file.name, "; ".join(map(str, problems)))
        return False
    manifest["eval"] = summary
    write_json_atomic(file, manifest)
    return True
