"""The LLM.int8 grid: bitsandbytes' row-wise int8 weights (``quant/bnb.py`` has the maths)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from quantbench.lazy import torch
from quantbench.quant import bnb
from quantbench.quant.grids.base import CONFIG_VERSION, Grid, check_version, register_grid
from quantbench.tensor import QuantizedTensor


@register_grid
@dataclass(frozen=True)
class Int8RowGridConfig(Grid):
    """LLM.int8 weights as bitsandbytes stores them: per output row ``SCB = max|w|`` (float32)
    and ``CB = round(w·127/SCB)`` (int8), dequantized as ``CB·SCB/127``. Held in a
    QuantizedTensor as unsigned codes ``CB + 128`` with ``SCB`` as the ``[out, 1]`` scales."""

    kind: ClassVar[str] = "int8_row"
    bits: ClassVar[int] = 8
    symmetric: ClassVar[bool] = True
    granularity: ClassVar[str] = "channel"

    @property
    def cli_group_size(self) -> int:
        return -1

    def n_groups(self, in_features: int) -> int:
        return 1

    def check_shape(self, name: str, out_features: int, in_features: int) -> None:
        """Any 2-D shape works."""

    def describe(self) -> str:
        return "int8 row-absmax/127"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": CONFIG_VERSION}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Int8RowGridConfig":
        check_version(data, "grid")
        return cls()

    def rtn(self, weight: torch.Tensor, *, scale_dtype: torch.dtype | None = None,
            importance: torch.Tensor | None = None) -> QuantizedTensor:
        """bitsandbytes' vector-wise int8 (``SCB`` float32 whatever ``scale_dtype``)."""
        cb, scb = bnb.int8_rows(weight)
        codes = (cb.to(torch.int16) + 128).to(torch.uint8)
        return QuantizedTensor(codes=codes, scales=scb.reshape(-1, 1), zeros=None, grid=self,
                               dtype=weight.dtype)

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        return bnb.int8_dequantize(qt.int8_codes(), qt.scales.reshape(-1))
