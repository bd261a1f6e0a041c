"""QuantizedTensor: the unit every method produces and every format packs."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from quantbench.lazy import torch

if TYPE_CHECKING:
    from quantbench.quant.grids.base import Grid


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

    The grid says what the parts mean (each grid's docstring: codebook indices and block
    absmax, LLM.int8 ``CB + 128`` and ``SCB``, GGUF block bytes, EXL2 scale codes) and does
    the work: validation, logical shape, ``dequantize``, storage bits and what ``equal``
    compares beyond the parts (``quant/grids/``).

    A *stack* (MoE experts) has one more leading dimension on every stored part: codes
    ``[experts, out, in]``, scales ``[experts, ...]`` and so on (``g_idx``/``perm`` and aux
    tensors too). :meth:`stack` builds one from 2-D tensors on one grid, ``qt[i]`` gives
    slice ``i`` back; shape, numel, dequantize, storage bits and equality treat the leading
    dimension as a stack of independent 2-D tensors.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    grid: "Grid"
    dtype: torch.dtype = field(default_factory=lambda: torch.float16)
    g_idx: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.codes.dim() == 3:
            self._check_stack()
            return
        if self.codes.dim() != 2:
            raise ValueError(f"codes must be 2-D [out, in] (or 3-D [experts, out, in]), got "
                             f"shape {tuple(self.codes.shape)}")
        self.grid.validate(self)

    # -- stacks (a leading experts dimension) ----------------------------------------------------

    @property
    def stacked(self) -> bool:
        """Whether this is a stack of 2-D tensors (codes ``[experts, out, in]``)."""
        return self.codes.dim() == 3

    def __len__(self) -> int:
        if not self.stacked:
            raise TypeError("a 2-D QuantizedTensor is not a stack; len() needs [experts, ...]")
        return int(self.codes.shape[0])

    def __getitem__(self, index: int) -> "QuantizedTensor":
        """Slice ``index`` of a stack as a 2-D tensor (views of the stored parts)."""
        if not self.stacked:
            raise TypeError("only a stacked QuantizedTensor can be indexed")
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"expert {index} of a stack of {n}")

        def part(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        metas = self.meta.get("stack")
        return QuantizedTensor(
            codes=self.codes[index], scales=self.scales[index], zeros=part(self.zeros),
            grid=self.grid, dtype=self.dtype, g_idx=part(self.g_idx), perm=part(self.perm),
            meta=dict(metas[index]) if metas else {},
            aux={k: v[index] for k, v in self.aux.items()})

    def slices(self) -> list["QuantizedTensor"]:
        """The 2-D tensors of a stack; ``[self]`` for a 2-D tensor."""
        return [self[i] for i in range(len(self))] if self.stacked else [self]

    @classmethod
    def stack(cls, parts: Sequence["QuantizedTensor"]) -> "QuantizedTensor":
        """2-D tensors of one shape on one grid (one per expert) as one stack; each part's
        ``meta`` is kept in ``meta["stack"]``."""
        if not parts:
            raise ValueError("cannot stack no tensors")
        first = parts[0]
        for p in parts:
            if p.stacked or p.grid != first.grid or p.dtype != first.dtype \
                    or p.shape != first.shape or p.aux.keys() != first.aux.keys():
                raise ValueError("a stack needs 2-D tensors of one shape, grid, dtype and aux")

        def joined(name: str) -> torch.Tensor | None:
            values = [getattr(p, name) for p in parts]
            if all(v is None for v in values):
                return None
            if any(v is None for v in values):
                raise ValueError(f"a stack needs {name} on every part or on none")
            return torch.stack(values)

        return cls(codes=torch.stack([p.codes for p in parts]),
                   scales=torch.stack([p.scales for p in parts]), zeros=joined("zeros"),
                   grid=first.grid, dtype=first.dtype, g_idx=joined("g_idx"),
                   perm=joined("perm"), meta={"stack": [dict(p.meta) for p in parts]},
                   aux={k: torch.stack([p.aux[k] for p in parts]) for k in first.aux})

    def _check_stack(self) -> None:
        n = int(self.codes.shape[0])
        parts = {"scales": self.scales, "zeros": self.zeros, "g_idx": self.g_idx,
                 "perm": self.perm, **{f"aux[{k!r}]": v for k, v in self.aux.items()}}
        for name, t in parts.items():
            if t is not None and (t.dim() == 0 or t.shape[0] != n):
                raise ValueError(f"a stack of {n} needs {name} with a leading dimension of {n}, "
                                 f"got {tuple(t.shape)}")
        for i in range(n):
            self[i]  # validates slice i on the grid

    # -- the tensor ------------------------------------------------------------------------------

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
    def shape(self) -> tuple[int, ...]:
        """The logical weight shape ``(out, in)``, or ``(experts, out, in)`` for a stack."""
        if self.stacked:
            return (len(self), *self.grid.shape(self[0]))
        return self.grid.shape(self)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def group_index(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx
        return self.grid.group_index(self.codes.shape[-1], self.codes.device)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Float weight; float32 unless a dtype is given (formats write ``self.dtype``)."""
        if self.stacked:
            w = torch.stack([s.dequantize() for s in self.slices()])
        else:
            w = self.grid.dequantize(self)
        return w if dtype is None else w.to(dtype)

    def block_absmax(self) -> torch.Tensor:
        """Codebook grids: the float32 absmax of every block (nested statistics undone)."""
        return self.grid.block_absmax(self)  # type: ignore[attr-defined]

    def int8_codes(self) -> torch.Tensor:
        """LLM.int8 grid: the signed int8 ``CB`` bitsandbytes stores."""
        return (self.codes.to(torch.int16) - 128).to(torch.int8)

    def storage_bits(self) -> int:
        """Bits a packed checkpoint spends on this tensor: codes, scales, zeros, g_idx."""
        return sum(self.grid.storage_bits(s) for s in self.slices())

    def bits_per_weight(self) -> float:
        return self.storage_bits() / self.numel

    def equal(self, other: "QuantizedTensor") -> bool:
        """Bit-exact equality of everything a format stores."""
        def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
            if a is None or b is None:
                return a is None and b is None
            return a.dtype == b.dtype and torch.equal(a, b)

        if self.stacked != other.stacked or self.codes.shape != other.codes.shape:
            return False
        if self.stacked:
            return self.grid == other.grid and \
                all(a.equal(b) for a, b in zip(self.slices(), other.slices()))
        return (
            self.grid == other.grid
            and same(self.codes, other.codes)
            and same(self.scales, other.scales)
            and same(self.zeros, other.zeros)
            and self.aux.keys() == other.aux.keys()
            and all(same(v, other.aux[k]) for k, v in self.aux.items())
            and self.grid.same_layout(self, other)
        )
