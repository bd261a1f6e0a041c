"""The integer grid: ``bits``-wide codes with a scale (and zero-point) per tensor, channel or
group; round-to-nearest and GPTQ onto it (``quant/grid.py``, ``quant/gptq.py``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from quantbench.errors import ConfigError
from quantbench.lazy import torch
from quantbench.quant.grid import dequantize_codes, fit_scales, group_index, quantize_codes
from quantbench.quant.gptq import (GPTQParams, GPTQStats, act_order, gptq_quantize,
                                   gptq_quantize_many, stack_rows)
from quantbench.quant.grids.base import Grid, register_grid, scale_dtype_for
from quantbench.ranges import Range
from quantbench.tensor import QuantizedTensor

GRANULARITIES = ("tensor", "channel", "group")
INT_BITS = Range(2, 8, integer=True)
# ``--group-size``: columns per group (at most each weight's row length: ``check_shape``), or
# the CLI's codes for the other granularities
GROUP_SIZE = Range(1, integer=True, also=((-1, "per output channel"), (0, "per tensor")))
GROUP_COLUMNS = Range(1, integer=True)


@register_grid
@dataclass(frozen=True)
class IntGridConfig(Grid):
    """An integer grid: ``bits``-wide unsigned codes with a scale (and zero-point) per group.

    Codes are stored unsigned in ``[0, 2**bits - 1]`` and dequantize as
    ``scale * (code - zero)``. A symmetric grid has the implicit zero ``2**(bits-1)`` and
    ``scale = absmax / (2**(bits-1) - 0.5)`` (GPTQ and compressed-tensors agree on this), so
    signed values span ``[-2**(bits-1), 2**(bits-1) - 1]``. A zero-point grid stretches
    ``[min(w, 0), max(w, 0)]`` over all ``2**bits`` codes with an integer zero.

    Granularity ``group`` cuts each row (input dimension) into groups of ``group_size``
    columns; when ``group_size`` does not divide the row the last group is shorter
    (``ceil(in / group_size)`` groups, column ``c`` in group ``c // group_size``), which is
    exactly what GPTQ's ``g_idx`` and compressed-tensors' group strategy express.
    """

    bits: int = 4
    symmetric: bool = True
    granularity: str = "group"
    group_size: int = 128

    kind: ClassVar[str] = "int"

    def __post_init__(self) -> None:
        INT_BITS.check(self.bits, "--bits")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}"
            )
        if self.granularity != "group":  # canonical CLI value: -1 channel, 0 tensor
            object.__setattr__(self, "group_size", -1 if self.granularity == "channel" else 0)
        else:
            GROUP_COLUMNS.check(self.group_size, "the group size of a 'group' grid",
                                "use granularity 'channel' or 'tensor' for the others")

    @classmethod
    def from_group_size(cls, bits: int, group_size: int, symmetric: bool) -> "IntGridConfig":
        """CLI convention: ``-1`` per output channel, ``0`` per tensor, ``>0`` groups."""
        GROUP_SIZE.check(group_size, "--group-size")
        if group_size == -1:
            return cls(bits=bits, symmetric=symmetric, granularity="channel", group_size=-1)
        if group_size == 0:
            return cls(bits=bits, symmetric=symmetric, granularity="tensor", group_size=0)
        return cls(bits=bits, symmetric=symmetric, granularity="group", group_size=group_size)

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def cli_group_size(self) -> int:
        return {"tensor": 0, "channel": -1}.get(self.granularity, self.group_size)

    @property
    def splits_rows(self) -> bool:  # type: ignore[override]
        """Per-channel and per-group scales belong to one row; a per-tensor scale does not."""
        return self.granularity != "tensor"

    def n_groups(self, in_features: int) -> int:
        if self.granularity == "group":
            return -(-in_features // self.group_size)
        return 1

    def group_width(self, in_features: int) -> int:
        return self.group_size if self.granularity == "group" else in_features

    def search_proxy(self) -> "IntGridConfig | None":
        """Itself, unless its scale is one per tensor."""
        return None if self.granularity == "tensor" else self

    def check_shape(self, name: str, out_features: int, in_features: int) -> None:
        """Refuse a grid that cannot work for a weight of this shape, before any work."""
        if self.granularity == "group" and self.group_size > in_features:
            raise ConfigError(
                f"group size {self.group_size} is larger than the row length {in_features} of "
                f"{name}; use a group size <= {in_features} or -1 for per-channel"
            )

    def describe(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        gran = {"tensor": "per-tensor", "channel": "per-channel"}.get(
            self.granularity, f"g{self.group_size}"
        )
        return f"int{self.bits} {kind} {gran}"

    # -- methods --------------------------------------------------------------------------------

    def rtn(self, weight: torch.Tensor, *, scale_dtype: torch.dtype | None = None,
            importance: torch.Tensor | None = None) -> QuantizedTensor:
        """Min/max scales (and zeros) per group, every weight rounded; no importance."""
        if scale_dtype is None:
            scale_dtype = scale_dtype_for(weight.dtype)
        scales, zeros = fit_scales(weight, self, scale_dtype)
        codes = quantize_codes(weight, scales, zeros, self)
        return QuantizedTensor(codes=codes, scales=scales, zeros=zeros, grid=self,
                               dtype=weight.dtype)

    def gptq(self, weight: torch.Tensor, hessian: torch.Tensor, params: Any = GPTQParams(),
             order: torch.Tensor | None = None) -> tuple[QuantizedTensor, GPTQStats]:
        return gptq_quantize(weight, hessian, self, params, scale_dtype_for(weight.dtype),
                             order)

    def gptq_many(self, weights: list[torch.Tensor], hessian: torch.Tensor, params: Any
                  ) -> list[tuple[QuantizedTensor, GPTQStats]]:
        """One stacked sweep (:func:`~quantbench.quant.gptq.gptq_quantize_many`)."""
        return gptq_quantize_many(weights, hessian, self, params,
                                  scale_dtype_for(weights[0].dtype))

    def gptq_rows(self, weight: torch.Tensor, rows: list[slice], hessians: torch.Tensor,
                  params: Any) -> tuple[QuantizedTensor, list[GPTQStats]]:
        """Row blocks share the act-order of their summed Hessians, so the tensor keeps one
        ``g_idx``/``perm``."""
        if not self.splits_rows:
            return super().gptq_rows(weight, rows, hessians, params)
        order = act_order(hessians.sum(0), params)
        scale_dtype = scale_dtype_for(weight.dtype)
        pieces, stats = [], []
        for r, h in zip(rows, hessians.to(weight.device)):
            piece, st = gptq_quantize(weight[r], h, self, params, scale_dtype, order)
            pieces.append(piece)
            stats.append(st)
        return stack_rows(pieces), stats

    # -- a QuantizedTensor on this grid ---------------------------------------------------------

    def group_index(self, in_features: int, device: Any = None) -> torch.Tensor:
        return group_index(in_features, self, device)

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        return dequantize_codes(qt.codes, qt.scales, qt.zeros, self, qt.group_index())

    def same_layout(self, a: QuantizedTensor, b: QuantizedTensor) -> bool:
        return torch.equal(a.group_index(), b.group_index())
