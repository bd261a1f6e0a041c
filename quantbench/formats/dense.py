"""``dense``: dequantized weights in the source dtype, a plain Hugging Face checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from quantbench.formats.base import Artifact, Format
from quantbench.lazy import torch
from quantbench.models.weights import LazyWeights
from quantbench.registry import register_format
from quantbench.tensor import QuantizedTensor


@register_format("dense")
class DenseFormat(Format):
    description = "dequantized weights in the original dtype; loads in plain transformers"
    stores_codes = False

    def encode(self, name: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        return {name: qt.dequantize(qt.dtype)}

    def read(self, path: Path, config: dict[str, Any], weights: LazyWeights,
             manifest: dict[str, Any] | None) -> Artifact:
        return Artifact(path=path, format=self.name, config=config, weights=weights,
                        manifest=manifest, plain_names=weights.names())
