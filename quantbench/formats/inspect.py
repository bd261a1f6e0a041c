"""``quantbench inspect``: what an artifact holds, from its files (not from the manifest alone)."""
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
        art = open_artifact(path)
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
         "size_bytes", "weights", "quantized_weights", "bits_per_weight_quantized",
         "bits_per_weight", "files_ok", "tensors")


def _describe(path: Path, art) -> dict[str, Any]:
    """The description of an artifact opened back."""
    tensors: list[dict[str, Any]] = []
    q_weights = q_bits = 0
    for name in art.quantized_names:
        qt = art.quantized(name)
        bits = qt.storage_bits()
        q_weights += qt.numel
        q_bits += bits
        dtype = "exl2" if qt.grid.kind == "exl2" else getattr(qt.grid, "codebook",
                                                               f"int{qt.grid.bits}")
        tensors.append({"name": name, "shape": list(qt.shape), "dtype": dtype,
                        "grid": qt.grid.describe(), "bits_per_weight": round(bits / qt.numel, 4)})
    plain_weights = plain_bits = 0
    for name in art.plain_names:
        t = art.weights.get(name)
        plain_weights += t.numel()
        plain_bits += t.numel() * t.element_size() * 8
        tensors.append({"name": name, "shape": list(t.shape),
                        "dtype": str(t.dtype).replace("torch.", ""),
                        "grid": None, "bits_per_weight": t.element_size() * 8})
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
        "size_bytes": art.size_bytes(),
        "weights": total_w,
        "quantized_weights": q_weights,
        "bits_per_weight_quantized": round(q_bits / q_weights, 4) if q_weights else None,
        "bits_per_weight": round((q_bits + plain_bits) / total_w, 4) if total_w else None,
        "files_ok": None,
        "tensors": tensors,
    }
