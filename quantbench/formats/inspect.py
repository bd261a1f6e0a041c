"""``quantbench inspect``: what an artifact holds, from its files (not from the manifest alone)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from quantbench.errors import FormatError
from quantbench.formats.io import open_artifact
from quantbench.formats.manifest import verify_files


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def inspect_artifact(path: Path) -> dict[str, Any]:
    """Format, config, tensors (dtype, shape, bits), size and bits per weight."""
    art = open_artifact(path)
    if not art.quantized_names and not art.plain_names:
        raise FormatError(f"{path} has no weights inspect can read (safetensors or GGUF); a "
                          "pytorch_model.bin checkpoint: run quantbench convert on it first")
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
        "files_ok": (not verify_files(path, manifest)) if manifest else None,
        "tensors": tensors,
    }
