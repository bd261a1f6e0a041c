"""QuantizedTensor: the unit every method produces and every format packs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from quantbench.config import GridConfig
from quantbench.quant import bnb
from quantbench.quant.exl2.grid import dequantize_exl2, total_bits
from quantbench.quant.grid import dequantize_codes, group_index
from quantbench.quant.gguf.codec import get_codec


@dataclass
class QuantizedTensor:
    """A weight ``[out, in]`` as unsigned integer codes on a grid.

    ``codes``: uint8 ``[out, in]`` in original column order, values ``0 .. 2**bits - 1``.
    ``scales``: ``[out or 1, n_groups]`` in the storage dtype (fp16/bf16).
    ``zeros``: int32 ``[out or 1, n_groups]`` unsigned zero codes, or None for a symmetric grid
    (implicit zero ``2**(bits-1)``).
    ``g_idx``: int32 ``[in]`` group of each input column; None means ``c // group_size``.
    ``perm``: optional column order the method processed (act-order), kept for formats
    that record it.
    ``dtype``: the dtype of the original weight (what dense outputs are written in).
    ``aux``: further stored tensors a grid needs (double quantization's nested statistics).

    On a codebook grid (NF4/FP4) ``codes`` are table indices and ``scales`` the per-block absmax
    ``[1, n_blocks]`` (float32, or uint8 codes of it under double quantization with
    ``aux["nested_absmax"]`` and ``aux["nested_offset"]``). On the LLM.int8 grid ``codes`` are
    ``CB + 128`` and ``scales`` the ``[out, 1]`` float32 row absmax ``SCB``. On a GGUF grid
    (one ggml tensor type) ``codes`` are the ggml block bytes ``[out, in / block · type_size]``
    row by row, in the HF row order, and ``scales`` is empty: the blocks carry their own.
    On an EXL2 mix ``codes`` are symmetric codes in original column order, ``scales`` the
    uint8 scale codes ``qscale`` (1..16) ``[out, n_groups]``, ``aux["q_scale_max"]`` the fp16
    ``[n_groups]`` maxima and ``perm`` the act-order (processing row ``r`` is column
    ``perm[r]``); groups run over the processing rows as the mix lays them out.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    grid: GridConfig
    dtype: torch.dtype = torch.float16
    g_idx: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.codes.dim() != 2:
            raise ValueError(f"codes must be 2-D [out, in], got shape {tuple(self.codes.shape)}")
        if self.grid.kind == "gguf":
            codec = get_codec(self.grid.type)
            if self.codes.dtype != torch.uint8 or self.codes.shape[1] % codec.type_size:
                raise ValueError(f"a {codec.name} row is whole {codec.type_size}-byte blocks "
                                 f"of uint8, got {self.codes.dtype} {tuple(self.codes.shape)}")
            return
        if self.grid.kind == "exl2":
            self._check_exl2()
            return
        if self.grid.kind == "codebook":
            n = self.grid.n_blocks(self.codes.numel())
            if tuple(self.scales.shape) != (1, n):
                raise ValueError(f"a {self.grid.describe()} weight of {self.codes.numel()} values "
                                 f"needs absmax of shape (1, {n}), got {tuple(self.scales.shape)}")
            return
        rows, n_groups = self.scales.shape
        if rows not in (1, self.codes.shape[0]):
            raise ValueError("scales rows must be 1 or out_features")
        if n_groups != self.grid.n_groups(self.codes.shape[1]) and self.g_idx is None:
            raise ValueError(
                f"scales have {n_groups} groups, grid {self.grid.describe()} needs "
                f"{self.grid.n_groups(self.codes.shape[1])}"
            )

    def _check_exl2(self) -> None:
        out_f, in_f = self.codes.shape
        n = self.grid.n_groups(in_f)
        qmax = self.aux.get("q_scale_max")
        if tuple(self.scales.shape) != (out_f, n) or qmax is None or qmax.numel() != n \
                or self.perm is None or self.perm.numel() != in_f:
            raise ValueError(f"an {self.grid.describe()} weight {out_f}x{in_f} needs scale codes "
                             f"({out_f}, {n}), q_scale_max ({n},) and a permutation ({in_f},)")

    def to(self, device: "torch.device | str") -> "QuantizedTensor":
        """The same tensor with every stored part on ``device`` (self when already there)."""
        device = torch.device(device)
        if self.codes.device == device:
            return self

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(
            self, codes=self.codes.to(device), scales=self.scales.to(device),
            zeros=move(self.zeros), g_idx=move(self.g_idx), perm=move(self.perm),
            aux={k: v.to(device) for k, v in self.aux.items()})

    @property
    def shape(self) -> tuple[int, int]:
        if self.grid.kind == "gguf":
            codec = get_codec(self.grid.type)
            return (self.codes.shape[0],
                    self.codes.shape[1] // codec.type_size * codec.block_size)
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def numel(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def group_index(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx
        return group_index(self.codes.shape[1], self.grid, self.codes.device)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Float weight; float32 unless a dtype is given (formats write ``self.dtype``)."""
        if self.grid.kind == "gguf":
            w = get_codec(self.grid.type).dequantize_rows(self.codes, self.shape[1])
        elif self.grid.kind == "codebook":
            w = bnb.dequantize_4bit(self.codes, self.block_absmax(), self.grid)
        elif self.grid.kind == "int8_row":
            w = bnb.int8_dequantize(self.int8_codes(), self.scales.reshape(-1))
        elif self.grid.kind == "exl2":
            w = dequantize_exl2(self.codes, self.scales, self.aux["q_scale_max"], self.perm,
                                self.grid)
        else:
            w = dequantize_codes(self.codes, self.scales, self.zeros, self.grid,
                                 self.group_index())
        return w if dtype is None else w.to(dtype)

    def block_absmax(self) -> torch.Tensor:
        """Codebook grids: the float32 absmax of every block (nested statistics undone)."""
        if self.scales.dtype == torch.uint8:
            return bnb.dequantize_absmax(self.scales, self.aux["nested_absmax"],
                                         self.aux["nested_offset"])
        return self.scales.reshape(-1).float()

    def int8_codes(self) -> torch.Tensor:
        """LLM.int8 grid: the signed int8 ``CB`` bitsandbytes stores."""
        return (self.codes.to(torch.int16) - 128).to(torch.int8)

    def storage_bits(self) -> int:
        """Bits a packed checkpoint spends on this tensor: codes, scales, zeros, g_idx."""
        if self.grid.kind == "gguf":
            return self.codes.numel() * 8
        if self.grid.kind == "exl2":  # exllamav2's own count (FORMATS.md §4.6)
            return total_bits(self.grid, self.shape[1], self.shape[0])
        bits = self.numel * self.grid.bits
        bits += self.scales.numel() * self.scales.element_size() * 8
        bits += sum(t.numel() * t.element_size() * 8 for t in self.aux.values())
        if self.grid.kind == "codebook":  # the tables bitsandbytes stores beside every weight
            bits += 16 * 32 + (256 * 32 if self.aux else 0)
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
            and self.aux.keys() == other.aux.keys()
            and all(same(v, other.aux[k]) for k, v in self.aux.items())
            and (self.grid.kind != "int"
                 or torch.equal(self.group_index(), other.group_index()))
            and (self.grid.kind != "exl2" or same(self.perm, other.perm))
        )
