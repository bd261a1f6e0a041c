"""GGUF grids: a llama.cpp mixture (``Q4_K_M``) for a run, or one ggml block type per tensor,
through the type's registered codec (``quant/gguf/``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from quantbench.errors import ConfigError
from quantbench.lazy import torch
from quantbench.quant.gguf.codec import BlockCodec, get_codec
from quantbench.quant.gguf.gptq_grid import gptq_gguf, gptq_gguf_rows
from quantbench.quant.gguf.plan import plan_tensor_types
from quantbench.quant.gptq import GPTQStats
from quantbench.quant.grids.base import Grid, register_grid
from quantbench.tensor import QuantizedTensor

GGUF_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K",
                     "Q3_K", "Q4_K", "Q5_K", "Q6_K")
GGUF_MIXTURES = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S",
                 "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
UNWEIGHTED_TYPES = ("F32", "F16", "BF16", "Q8_0")   # their encoders take no importance

# the integer grid a scale search stands in for a ggml block type with: (bits, group, symmetric)
PROXY_GRIDS = {"Q2_K": (2, 16, False), "Q3_K": (3, 16, True), "Q4_K": (4, 32, False),
               "Q5_K": (5, 32, False), "Q6_K": (6, 16, True), "Q4_0": (4, 32, True),
               "Q4_1": (4, 32, False), "Q5_0": (5, 32, True), "Q5_1": (5, 32, False),
               "Q8_0": (8, 32, True)}


def proxy_grid(ggml_type: str) -> "Grid | None":
    """The integer grid AWQ's scale and clip searches stand in for a ggml block type with
    (Q4_K → 4-bit g32 with a zero-point, Q5_0 → symmetric 5-bit g32, Q3_K → symmetric 3-bit
    g16); None for float types."""
    from quantbench.quant.grids.int import IntGridConfig

    if ggml_type not in PROXY_GRIDS:
        return None
    bits, group, symmetric = PROXY_GRIDS[ggml_type]
    return IntGridConfig.from_group_size(bits, group, symmetric)


@register_grid
@dataclass(frozen=True)
class GGUFGridConfig(Grid):
    """A GGUF quantization: ``type`` is a mixture llama-quantize knows by name (``Q4_K_M``:
    per-tensor types chosen by llama.cpp's rules, :meth:`plan`) for a run, or one ggml tensor
    type (``Q6_K``) for a single tensor. A tensor on this grid is held as its ggml block bytes
    ``[out, in / block · type_size]``, row by row in the HF row order, and ``scales`` is
    empty: the blocks carry their own."""

    type: str = "Q4_K_M"

    kind: ClassVar[str] = "gguf"
    splits_rows: ClassVar[bool] = True          # block bytes are per row
    attention_values_default: ClassVar[bool] = True
    weighs_importance: ClassVar[bool] = True

    def __post_init__(self) -> None:
        t = str(self.type).upper()
        if t not in GGUF_MIXTURES and t not in GGUF_TENSOR_TYPES:
            from quantbench.registry import did_you_mean

            hint = did_you_mean(self.type, [*GGUF_MIXTURES, *GGUF_TENSOR_TYPES])
            raise ConfigError(f"unknown GGUF type {self.type!r}; {hint}use one of "
                              f"{', '.join(GGUF_MIXTURES)}")
        object.__setattr__(self, "type", t)

    @property
    def bits(self) -> int:
        """The nominal width (Q4_K_M → 4, F16 → 16)."""
        digits = "".join(ch for ch in self.type.split("_")[0] if ch.isdigit())
        return int(digits) if digits else 32

    @property
    def codec(self) -> BlockCodec:
        """The block codec of a single ggml type (a mixture has none: :meth:`plan` it)."""
        return get_codec(self.type)

    def check_shape(self, name: str, out_features: int, in_features: int) -> None:
        """Rows that fit no block (not a multiple of 32) stay in F16, as llama.cpp does."""

    def describe(self) -> str:
        return f"GGUF {self.type}"

    # -- methods --------------------------------------------------------------------------------

    def plan(self, model: Any, targets: Sequence[str], has_imatrix: bool = False
             ) -> dict[str, "Grid"]:
        """Each target's ggml type by llama-quantize's rules for this mixture."""
        types = plan_tensor_types(self.type, model, list(targets), has_imatrix=has_imatrix)
        return {name: GGUFGridConfig(t) for name, t in types.items()}

    def search_proxy(self) -> "Grid | None":
        """:func:`proxy_grid` of this type (of a mixture: of its main type)."""
        from quantbench.quant.gguf.mixtures import DEFAULT_TYPES

        return proxy_grid(DEFAULT_TYPES.get(self.type, self.type))

    def tensor(self, data: torch.Tensor, dtype: torch.dtype) -> QuantizedTensor:
        """Block bytes ``[rows, row_bytes]`` of this type as a ``QuantizedTensor``."""
        return QuantizedTensor(codes=data, scales=torch.empty(0), zeros=None, grid=self,
                               dtype=dtype)

    def rtn(self, weight: torch.Tensor, *, scale_dtype: torch.dtype | None = None,
            importance: torch.Tensor | None = None) -> QuantizedTensor:
        """The type's own quantizer (llama.cpp's ``_ref``, or ``_impl`` with ``importance``;
        the float types and Q8_0 take none)."""
        weighted = importance if self.type not in UNWEIGHTED_TYPES else None
        return self.tensor(self.codec.quantize_rows(weight, weighted), weight.dtype)

    def gptq(self, weight: torch.Tensor, hessian: torch.Tensor, params: Any,
             order: torch.Tensor | None = None) -> tuple[QuantizedTensor, GPTQStats]:
        """Blocks fitted first, then GPTQ's sweep on their fixed grid (``gptq_gguf``, on the
        CPU); the block grid is per row, so each call takes its own act-order (``order`` is
        not used)."""
        data, stats = gptq_gguf(weight.cpu(), hessian.cpu(), self.type, params)
        return self.tensor(data, weight.dtype), stats

    def gptq_many(self, weights: list[torch.Tensor], hessian: torch.Tensor, params: Any
                  ) -> list[tuple[QuantizedTensor, GPTQStats]]:
        """Weights stacked row-wise into one sweep (per-row block fits, so the same bytes as
        one sweep each up to float summation order) and split."""
        stacked = torch.cat([w.cpu().float() for w in weights])
        data, stats, losses = gptq_gguf_rows(stacked, hessian.cpu(), self.type, params)
        out, row = [], 0
        for w in weights:
            rows = slice(row, row + int(w.shape[0]))
            row = rows.stop
            out.append((self.tensor(data[rows].clone(), w.dtype), dataclasses.replace(
                stats, proxy_error=float(losses[rows].sum()))))
        return out

    def gptq_rows(self, weight: torch.Tensor, rows: list[slice], hessians: torch.Tensor,
                  params: Any) -> tuple[QuantizedTensor, list[GPTQStats]]:
        """Every row block with its own act-order (the block bytes are per row)."""
        parts, stats = [], []
        for r, h in zip(rows, hessians.cpu()):
            data, st = gptq_gguf(weight[r].cpu(), h, self.type, params)
            parts.append(data)
            stats.append(st)
        return self.tensor(torch.cat(parts), weight.dtype), stats

    # -- a QuantizedTensor on this grid ---------------------------------------------------------

    def validate(self, qt: QuantizedTensor) -> None:
        codec = self.codec
        if qt.codes.dtype != torch.uint8 or qt.codes.shape[1] % codec.type_size:
            raise ValueError(f"a {codec.name} row is whole {codec.type_size}-byte blocks "
                             f"of uint8, got {qt.codes.dtype} {tuple(qt.codes.shape)}")

    def shape(self, qt: QuantizedTensor) -> tuple[int, int]:
        codec = self.codec
        return (qt.codes.shape[0], qt.codes.shape[1] // codec.type_size * codec.block_size)

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        return self.codec.dequantize_rows(qt.codes, self.shape(qt)[1])

    def non_finite_parts(self, qt: QuantizedTensor) -> list[str]:
        """The block scales live inside the bytes (read without decoding the codes)."""
        return ["block scales"] if bool(self.codec.non_finite_blocks(qt.codes).any()) else []

    def storage_bits(self, qt: QuantizedTensor) -> int:
        return qt.codes.numel() * 8
