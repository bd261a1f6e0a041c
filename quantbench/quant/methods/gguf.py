"""Methods on GGUF grids: ``rtn`` (llama.cpp's reference quantizers, data-free) and ``imatrix``
(importance from the calibration layer weighting the scale/min search, as llama.cpp's
``--imatrix`` does). A run's grid names a mixture (``Q4_K_M``); ``prepare`` resolves it to one
ggml type per tensor with llama.cpp's rules, and each tensor is quantized with that type's codec.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from quantbench.config import (CalibrationOptions, GGUFGridConfig, GridConfig, IntGridConfig,
                               MethodOptions, QuantizeConfig)
from quantbench.errors import ConfigError
from quantbench.quant.gguf.codec import get_codec
from quantbench.quant.methods.base import Method
from quantbench.quant.methods.rtn import _scale_dtype, rtn_quantize
from quantbench.registry import register_method
from quantbench.tensor import QuantizedTensor

log = logging.getLogger(__name__)


class GGUFPlan:
    """Mixin for any method that can target GGUF: the per-tensor type plan of a mixture and one
    tensor's encoding with the type's own codec (llama.cpp's RTN / imatrix quantizers)."""

    config: QuantizeConfig
    needs_calibration: bool

    def __init__(self, config: QuantizeConfig):
        super().__init__(config)
        self.types: dict[str, str] = {}

    def prepare(self, model, targets: list[str]) -> None:
        """Resolve the mixture to a ggml type per target (llama.cpp's rules)."""
        from quantbench.quant.gguf.plan import plan_tensor_types

        if self.config.grid.kind == "gguf":
            self.types = plan_tensor_types(self.config.grid.type, model, targets,
                                           has_imatrix=self.needs_calibration)

    def tensor_type(self, name: str) -> str:
        if name not in self.types:
            raise ConfigError(f"{name} has no GGUF type in this run's plan")
        return self.types[name]

    def quantize_gguf(self, name: str, weight: torch.Tensor,
                      importance: torch.Tensor | None = None) -> QuantizedTensor:
        ggml_type = self.tensor_type(name)
        codec = get_codec(ggml_type)
        data = codec.quantize_rows(weight, importance if _uses_importance(ggml_type) else None)
        return gguf_tensor(data, ggml_type, weight.dtype)


def gguf_tensor(data: torch.Tensor, ggml_type: str, dtype: torch.dtype) -> QuantizedTensor:
    """A tensor's ggml block bytes ``[rows, row_bytes]`` as a ``QuantizedTensor``."""
    return QuantizedTensor(codes=data, scales=torch.empty(0), zeros=None,
                           grid=GGUFGridConfig(ggml_type), dtype=dtype)


class _GGUFMethod(GGUFPlan, Method):
    """Shared by the GGUF-native methods: the per-tensor type plan and one tensor's
    quantization."""

    native_format = "gguf"
    gguf_capable = True


def _uses_importance(ggml_type: str) -> bool:
    return ggml_type not in ("F32", "F16", "BF16", "Q8_0")


@register_method("rtn")
class RTN(_GGUFMethod):
    description = ("round-to-nearest with the grid's own fit: llama.cpp's reference quantizers "
                   "on GGUF types, min/max scales on integer grids")
    options_cls = MethodOptions

    @classmethod
    def make_grid(cls, bits: int, group_size: int, symmetric: bool | None,
                  options: MethodOptions) -> GridConfig:
        if group_size == 0:
            group_size = 128
        return IntGridConfig.from_group_size(bits, group_size, bool(symmetric) if symmetric
                                             is not None else False)

    def quantize_weight(self, name: str, weight: torch.Tensor) -> QuantizedTensor:
        if self.config.grid.kind == "gguf":
            return self.quantize_gguf(name, weight)
        return rtn_quantize(weight, self.config.grid, _scale_dtype(weight.dtype))


@dataclass(frozen=True)
class ImatrixOptions(CalibrationOptions):
    calib_samples: int = 64


@register_method("imatrix")
class Imatrix(_GGUFMethod):
    description = ("llama.cpp's importance-weighted scale/min search, importance (mean x² per "
                   "input column) from the calibration layer")
    options_cls = ImatrixOptions
    needs_calibration = True
    statistic = "importance"

    @classmethod
    def check(cls, config: QuantizeConfig) -> None:
        if config.grid.kind != "gguf":
            raise ConfigError("imatrix weights GGUF block searches; pass --format gguf "
                              "--type Q4_K_M (or another GGUF type)")

    def quantize_weight(self, name: str, weight: torch.Tensor) -> QuantizedTensor:
        # Embeddings and lm_head are quantized before the blocks, without importance: llama.cpp
        # has none for token_embd either (its imatrix covers output.weight; ours does not yet).
        return self.quantize_gguf(name, weight)

    def quantize_with_stats(self, name: str, weight: torch.Tensor,
                            importance: torch.Tensor) -> QuantizedTensor:
        return self.quantize_gguf(name, weight, importance)
