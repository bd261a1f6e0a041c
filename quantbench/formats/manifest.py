"""``quantbench.json``: what was done, to which source, and the checksum of every file."""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from quantbench.errors import QuantbenchError
from quantbench.formats.base import MANIFEST, MANIFEST_VERSION
WEIGHT_FILES = ("model.gguf",)  # weight files besides *.safetensors (side files do not count)


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

    The temporary name is unique (``mkstemp``), so two writers of one path never share it; the
    parent folder is created; a reader sees the old file or the whole new one, never a part.
    """
    path = Path(path)
    check_file_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    with atomic_write(path, "w") as fh:  # e.g. `--json out/report.json` creates out/
        json.dump(payload, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")


def file_table(directory: Path) -> dict[str, dict[str, Any]]:
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }


def summarize_tensors(info: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def total(rows):
        n = sum(_numel(r["shape"]) for r in rows)
        bits = sum(_numel(r["shape"]) * r["bits_per_weight"] for r in rows)
        return n, bits

    quant = [r for r in info.values() if r["quantized"]]
    n_q, bits_q = total(quant)
    n_all, bits_all = total(list(info.values()))
    return {
        "quantized_tensors": len(quant),
        "quantized_weights": n_q,
        "total_weights": n_all,
        "bits_per_weight_quantized": round(bits_q / n_q, 4) if n_q else None,
        "bits_per_weight": round(bits_all / n_all, 4) if n_all else None,
    }


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def build_manifest(directory: Path, qmodel, fmt: str, tensor_info: dict[str, dict[str, Any]],
                   write_seconds: float, command: list[str] | None = None) -> dict[str, Any]:
    """The manifest of a written artifact; ``command`` (the argv of the CLI run that wrote it)
    is recorded when given, so a model card can quote it (older manifests lack the key)."""
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
                                      if name in WEIGHT_FILES or name.endswith(".safetensors")),
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
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """Names of files whose size or sha256 differs from the manifest (missing included)."""
    bad = []
    for name, entry in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != entry["bytes"] or \
                sha256_file(path) != entry["sha256"]:
            bad.append(name)
    return bad


def record_eval(directory: Path, summary: dict[str, Any]) -> None:
    """Store the evaluation summary in an existing manifest (other fields untouched)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return
    manifest = json.loads(path.read_text())
    manifest["eval"] = summary
    write_json_atomic(path, manifest)
