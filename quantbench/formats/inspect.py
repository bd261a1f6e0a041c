"""``quantbench inspect``: what an artifact holds, from its files (not from the manifest alone).

Read from the headers — safetensors' JSON header, the GGUF header walk, config.json and the
manifest — held to the same checks as any use of the artifact (``open_artifact``), and each
quantized tensor described as its format's reader would decode it (``Artifact.summary``),
without reading tensor data or importing torch; only verifying the files against the
manifest reads them whole (streamed through sha256)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from quantbench.formats.io import open_artifact
from quantbench.formats.manifest import (FileProblem, load_checked_manifest, manifest_path,
                                         verify_files, vouched_for)

log = logging.getLogger(__name__)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def inspect_artifact(path: Path, verify: bool = True) -> dict[str, Any]:
    """Format, config, tensors (dtype, shape, bits), size and bits per weight.

    With ``verify`` the files are first checked against the manifest (if one vouches for the
    path): ``files_ok`` says whether they match it (None: nothing checked), and when they do
    not, ``files_failed`` lists each file and why, and the rest is read as far as the damage
    allows (what cannot be read is left None, with ``unreadable`` saying why)."""
    problems = _check_files(path, verify)
    try:
        art = open_artifact(path, headers_only=True)
    except Exception as exc:  # a damaged file may break any reader; say so, do not hide it
        if not problems:
            raise
        return _unreadable(path, problems, exc)
    info = _describe(path, art)
    info["files_ok"] = None if problems is None else not problems
    if problems:
        info["files_failed"] = [{"name": p.name, "why": p.why} for p in problems]
    return info


def failed_files(info: dict[str, Any]) -> list[FileProblem]:
    """The files ``inspect_artifact`` found not as the manifest records."""
    return [FileProblem(f["name"], f["why"]) for f in info.get("files_failed", [])]


def _check_files(path: Path, verify: bool) -> list[FileProblem] | None:
    manifest = manifest_path(path)
    if manifest is None:
        return None
    if not verify:
        log.warning("%s: files not checked against its %s (--no-verify)", vouched_for(manifest),
                    manifest.name)
        return None
    return verify_files(manifest, load_checked_manifest(manifest))


def _unreadable(path: Path, problems: list[FileProblem], exc: Exception) -> dict[str, Any]:
    info: dict[str, Any] = dict.fromkeys(_KEYS)
    info.update(path=str(path), tensors=[], files_ok=False,
                files_failed=[{"name": p.name, "why": p.why} for p in problems],
                unreadable=" ".join(f"{type(exc).__name__}: {exc}".split()))
    return info


_KEYS = ("path", "format", "architecture", "quantization_config", "quantize", "source", "eval",
         "experts",
         "size_bytes", "weights", "quantized_weights", "bits_per_weight_quantized",
         "bits_per_weight", "files_ok", "tensors")


def _describe(path: Path, art) -> dict[str, Any]:
    """The description of an artifact opened back (from its headers)."""
    tensors: list[dict[str, Any]] = []
    q_weights = q_bits = 0
    for name in art.quantized_names:
        qt = art.summary(name)
        bits, numel = qt.storage_bits, _numel(qt.shape)
        q_weights += numel
        q_bits += bits
        dtype = "exl2" if qt.grid.kind == "exl2" else getattr(qt.grid, "codebook",
                                                               f"int{qt.grid.bits}")
        tensors.append({"name": name, "shape": list(qt.shape), "dtype": dtype,
                        "grid": qt.grid.describe(), "bits_per_weight": round(bits / numel, 4)})
    plain_weights = plain_bits = 0
    for name in art.plain_names:
        shape, element_bits = art.weights.shape(name), art.weights.element_bits(name)
        plain_weights += _numel(shape)
        plain_bits += _numel(shape) * element_bits
        tensors.append({"name": name, "shape": list(shape),
                        "dtype": art.weights.dtype_name(name),
                        "grid": None, "bits_per_weight": element_bits})
    manifest = art.manifest or {}
    total_w = q_weights + plain_weights
    return {
        "path": str(path),
        "format": art.format,
        "architecture": art.config.get("model_type"),
        "quantization_config": art.config.get("quantization_config"),
        "quantize": manifest.get("quantize"),
        "source": manifest.get("source"),
        "eval": manifest.get("eval"),
        "experts": manifest.get("experts"),
        "size_bytes": art.size_bytes(),
        "weights": total_w,
        "quantized_weights": q_weights,
        "bits_per_weight_quantized": round(q_bits / q_weights, 4) if q_weights else None,
        "bits_per_weight": round((q_bits + plain_bits) / total_w, 4) if total_w else None,
        "files_ok": None,
        "tensors": tensors,
    }
