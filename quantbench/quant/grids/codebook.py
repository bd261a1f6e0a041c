"""The bitsandbytes 4-bit codebook grids (NF4/FP4), blockwise over the flattened weight
(``quant/bnb.py`` has the maths)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from quantbench.errors import ConfigError
from quantbench.lazy import torch
from quantbench.quant import bnb
from quantbench.quant.grids.base import Grid, packed_bits, register_grid
from quantbench.ranges import Range
from quantbench.tensor import QuantizedTensor

BNB_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BLOCK_SIZE = Range(values=BNB_BLOCK_SIZES, integer=True)
CODEBOOKS = ("nf4", "fp4")


@register_grid
@dataclass(frozen=True)
class CodebookGridConfig(Grid):
    """bitsandbytes 4-bit: the weight flattened row-major, cut into blocks of ``block_size``
    values (a final partial block allowed), one absmax per block, each value the nearest entry
    of the 16-value NF4 or FP4 table scaled by it. With ``double_quant`` the absmax values are
    themselves quantized (blocks of 256, 8-bit signed dynamic map, mean offset).

    A tensor on this grid holds table indices as ``codes`` and the per-block absmax
    ``[1, n_blocks]`` as ``scales`` (float32, or uint8 codes of it under double quantization
    with ``aux["nested_absmax"]`` and ``aux["nested_offset"]``)."""

    codebook: str = "nf4"
    block_size: int = 64
    double_quant: bool = False

    kind: ClassVar[str] = "codebook"
    bits: ClassVar[int] = 4
    nested_block_size: ClassVar[int] = bnb.NESTED_BLOCK_SIZE

    def __post_init__(self) -> None:
        if self.codebook not in CODEBOOKS:
            raise ConfigError(f"codebook must be one of {', '.join(CODEBOOKS)}, "
                              f"got {self.codebook!r}")
        BLOCK_SIZE.check(self.block_size, f"--group-size (the {self.codebook} block size)",
                         "bitsandbytes' block sizes; 64 is the default")

    @property
    def cli_group_size(self) -> int:
        return self.block_size

    def n_blocks(self, numel: int) -> int:
        return -(-numel // self.block_size)

    def check_shape(self, name: str, out_features: int, in_features: int) -> None:
        """Any 2-D shape works: blocks run over the flattened weight."""

    def describe(self) -> str:
        return f"{self.codebook} b{self.block_size}" + (" +dq" if self.double_quant else "")

    def rtn(self, weight: torch.Tensor, *, scale_dtype: torch.dtype | None = None,
            importance: torch.Tensor | None = None) -> QuantizedTensor:
        """bitsandbytes' blockwise absmax and nearest table entry (float32 absmax, or its
        double quantization); no importance."""
        codes, absmax = bnb.quantize_4bit(weight, self)
        aux: dict[str, torch.Tensor] = {}
        scales = absmax
        if self.double_quant:
            scales, nested, offset = bnb.quantize_absmax(absmax)
            aux = {"nested_absmax": nested, "nested_offset": offset.reshape(())}
        return QuantizedTensor(codes=codes, scales=scales.reshape(1, -1), zeros=None, grid=self,
                               dtype=weight.dtype, aux=aux)

    def validate(self, qt: QuantizedTensor) -> None:
        n = self.n_blocks(qt.codes.numel())
        if tuple(qt.scales.shape) != (1, n):
            raise ValueError(f"a {self.describe()} weight of {qt.codes.numel()} values "
                             f"needs absmax of shape (1, {n}), got {tuple(qt.scales.shape)}")

    def block_absmax(self, qt: QuantizedTensor) -> torch.Tensor:
        """The float32 absmax of every block of ``qt`` (nested statistics undone)."""
        if qt.scales.dtype == torch.uint8:
            return bnb.dequantize_absmax(qt.scales, qt.aux["nested_absmax"],
                                         qt.aux["nested_offset"])
        return qt.scales.reshape(-1).float()

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        return bnb.dequantize_4bit(qt.codes, self.block_absmax(qt), self)

    def storage_bits(self, qt: QuantizedTensor) -> int:
        """Codes, absmax (and nested statistics) plus the tables bitsandbytes stores beside
        every weight."""
        return packed_bits(qt, self.bits) + self.table_bits(bool(qt.aux))

    @staticmethod
    def table_bits(nested: bool) -> int:
        """The 16-entry quant_map (and, with nested statistics, their 256-entry map)."""
        return 16 * 32 + (256 * 32 if nested else 0)
