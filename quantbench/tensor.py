"""QuantizedTensor: the unit every method produces and every format packs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from quantbench.config import IntGridConfig
from quantbench.quant.grid import dequantize_codes, group_index


@dataclass
class QuantizedTensor:
    """A weight ``[out, in]`` as unsigned integer codes on an integer grid.

    ``codes``: uint8 ``[out, in]`` in original column order, values ``0 .. 2**bits - 1``.
    ``scales``: ``[out or 1, n_groups]`` in the storage dtype (fp16/bf16).
    ``zeros``: int32 ``[out or 1, n_groups]`` unsigned zero codes, or None for a symmetric grid
    (implicit zero ``2**(bits-1)``).
    ``g_idx``: int32 ``[in]`` group of each input column; None means ``c // group_size``.
    ``perm``: optional column order the method processed (act-order), kept for formats
    that record it.
    ``dtype``: the dtype of the original weight (what dense outputs are written in).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    grid: IntGridConfig
    dtype: torch.dtype = torch.float16
    g_idx: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.codes.dim() != 2:
            raise ValueError(f"codes must be 2-D [out, in], got shape {tuple(self.codes.shape)}")
        rows, n_groups = self.scales.shape
        if rows not in (1, self.codes.shape[0]):
            raise ValueError("scales rows must be 1 or out_features")
        if n_groups != self.grid.n_groups(self.codes.shape[1]) and self.g_idx is None:
            raise ValueError(
                f"scales have {n_groups} groups, grid {self.grid.describe()} needs "
                f"{self.grid.n_groups(self.codes.shape[1])}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def numel(self) -> int:
        return self.codes.numel()

    def group_index(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx
        return group_index(self.codes.shape[1], self.grid, self.codes.device)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Float weight; float32 unless a dtype is given (formats write ``self.dtype``)."""
        w = dequantize_codes(self.codes, self.scales, self.zeros, self.grid, self.group_index())
        return w if dtype is None else w.to(dtype)

    def storage_bits(self) -> int:
        """Bits a packed checkpoint spends on this tensor: codes, scales, zeros, g_idx."""
        bits = self.numel * self.grid.bits
        bits += self.scales.numel() * self.scales.element_size() * 8
        if self.zeros is not None:
            bits += self.zeros.numel() * self.grid.bits
        if self.g_idx is not None and self.perm is not None:
            bits += self.g_idx.numel() * 32
        return bits

    def bits_per_weight(self) -> float:
        return self.storage_bits() / self.numel

    def equal(self, other: "QuantizedTensor") -> bool:
        """Bit-exact equality of everything a format stores."""
        def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
            if a is None or b is None:
                return a is None and b is None
            return a.dtype == b.dtype and torch.equal(a, b)

        return (
            self.grid == other.grid
            and same(self.codes, other.codes)
            and same(self.scales, other.scales)
            and same(self.zeros, other.zeros)
            and torch.equal(self.group_index(), other.group_index())
        )
