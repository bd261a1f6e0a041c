"""The EXL2 grid: an exllamav2 mix of bit widths over act-ordered input rows
(``quant/exl2/grid.py`` has the maths, ``quant/exl2/gptq.py`` the sweep)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from quantbench.errors import ConfigError
from quantbench.lazy import torch
from quantbench.quant.exl2.gptq import EXL2Params, exl2_quantize
from quantbench.quant.exl2.grid import dequantize_exl2, group_layout, total_bits
from quantbench.quant.gptq import GPTQStats
from quantbench.quant.grids.base import CONFIG_VERSION, Grid, register_grid
from quantbench.ranges import Range
from quantbench.tensor import QuantizedTensor

EXL2_WIDTHS = (8, 6, 5, 4, 3, 2)
WIDTH = Range(values=tuple(sorted(EXL2_WIDTHS)), integer=True)
# a run's bits-per-weight target (the model's cheapest and dearest mixes bound it further:
# ``quant/exl2/measure.py`` ``check_target``)
BPW = Range(1, 16, low_open=True)
# rows per group: exllamav2's kernels take multiples of 32
GROUP_ROWS = Range(32, integer=True, multiple_of=32)


@register_grid
@dataclass(frozen=True)
class EXL2GridConfig(Grid):
    """EXL2 (exllamav2, FORMATS.md §4). One tensor's setting is a *mix*: bit widths in
    descending order, the share of input rows (in act-order) each covers and its group size,
    as exllamav2's ``QParams`` (``widths=(5, 4), proportions=(0.1, 0.9), group_sizes=(32,
    128)``). Per group and output column a 4-bit scale code ``qscale`` gives the scale
    ``qscale²·qscale_max/256`` (one ``qscale_max`` per group); codes are symmetric.

    A run's grid names a target ``bpw`` instead: the measured optimiser then gives every
    layer its own mix, and each tensor carries that mix as its grid.

    A tensor on a mix holds symmetric codes in original column order, the uint8 scale codes
    ``qscale`` (1..16) ``[out, n_groups]`` as ``scales``, ``aux["q_scale_max"]`` the fp16
    ``[n_groups]`` maxima and ``perm`` the act-order (processing row ``r`` is column
    ``perm[r]``); groups run over the processing rows as the mix lays them out."""

    widths: tuple[int, ...] = (4,)
    proportions: tuple[float, ...] = (1.0,)
    group_sizes: tuple[int, ...] = (128,)
    bpw: float | None = None

    kind: ClassVar[str] = "exl2"

    def __post_init__(self) -> None:
        for name in ("widths", "proportions", "group_sizes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.bpw is not None:
            BPW.check(self.bpw, "--bpw", "e.g. --bpw 4.65")
            object.__setattr__(self, "bpw", float(self.bpw))
        if not self.widths or not len(self.widths) == len(self.proportions) == \
                len(self.group_sizes):
            raise ConfigError("an EXL2 mix needs one proportion and one group size per width")
        for width in self.widths:
            WIDTH.check(width, "--bits (an EXL2 width)")
        if list(self.widths) != sorted(set(self.widths), reverse=True):
            raise ConfigError(f"EXL2 widths must be distinct and descending (exllamav2's "
                              f"loader requires it), got {list(self.widths)}")
        if any(not p > 0 for p in self.proportions) or abs(sum(self.proportions) - 1) > 1e-6:
            raise ConfigError(f"EXL2 proportions must be positive and sum to 1, got "
                              f"{list(self.proportions)}")
        for group in self.group_sizes:
            GROUP_ROWS.check(group, "--group-size (rows per EXL2 group)")

    @property
    def is_target(self) -> bool:
        """A run's bits-per-weight target (the optimiser picks each layer's mix)."""
        return self.bpw is not None

    @property
    def bits(self) -> float:
        """The nominal width: the target bpw, or the mix's mean code width."""
        if self.bpw is not None:
            return self.bpw
        return round(sum(b * p for b, p in zip(self.widths, self.proportions)), 4)

    @property
    def cli_group_size(self) -> int:
        if self.is_target:
            return 0
        return self.group_sizes[max(range(len(self.widths)), key=self.proportions.__getitem__)]

    @property
    def desc(self) -> str:
        """exllamav2's notation: ``0.1:5b_32g/0.9:4b_128g``."""
        return "/".join(f"{p:g}:{b}b_{g}g" for b, p, g in
                        zip(self.widths, self.proportions, self.group_sizes))

    @classmethod
    def from_desc(cls, desc: str) -> "EXL2GridConfig":
        try:
            parts = [item.split(":") for item in desc.split("/")]
            mix = [(int(s.split("b_")[0]), float(p), int(s.split("b_")[1].rstrip("g")))
                   for p, s in parts]
        except (ValueError, IndexError) as exc:
            raise ConfigError(f"cannot read EXL2 setting {desc!r}; expected e.g. "
                              "'0.1:5b_32g/0.9:4b_128g'") from exc
        return cls(tuple(m[0] for m in mix), tuple(m[1] for m in mix), tuple(m[2] for m in mix))

    def n_groups(self, in_features: int) -> int:
        return len(group_layout(self, in_features))

    def check_shape(self, name: str, out_features: int, in_features: int) -> None:
        """exllamav2 processes input rows 32 at a time and stores permutations as int16."""
        if in_features % 32 or in_features > 32767:
            raise ConfigError(f"EXL2 needs a row length that is a multiple of 32 and at most "
                              f"32767; {name} has {in_features}; exclude it (--exclude)")

    def describe(self) -> str:
        return f"EXL2 {self.bpw:g} bpw" if self.is_target else f"EXL2 {self.desc}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": CONFIG_VERSION, "widths": list(self.widths),
                "proportions": list(self.proportions), "group_sizes": list(self.group_sizes),
                "bpw": self.bpw}

    # -- methods --------------------------------------------------------------------------------

    def rtn(self, weight: torch.Tensor, *, scale_dtype: torch.dtype | None = None,
            importance: torch.Tensor | None = None) -> QuantizedTensor:
        """Group by group in the original row order (fp16 scale codes whatever
        ``scale_dtype``; no importance)."""
        return exl2_quantize(weight, None, self)[0]

    def gptq(self, weight: torch.Tensor, hessian: torch.Tensor, params: Any = EXL2Params(),
             order: torch.Tensor | None = None) -> tuple[QuantizedTensor, GPTQStats]:
        """GPTQ with act-order onto this mix (``exl2_quantize``); ``params`` is
        :class:`~quantbench.quant.exl2.gptq.EXL2Params` or anything with its fields
        (``damp_percent``, ``block_size``, ``act_order``); ``order`` is not used."""
        if not isinstance(params, EXL2Params):
            params = EXL2Params(**{f.name: getattr(params, f.name)
                                   for f in dataclasses.fields(EXL2Params)})
        return exl2_quantize(weight, hessian, self, params)

    # -- a QuantizedTensor on this grid ---------------------------------------------------------

    def validate(self, qt: QuantizedTensor) -> None:
        out_f, in_f = qt.codes.shape
        n = self.n_groups(in_f)
        qmax = qt.aux.get("q_scale_max")
        if tuple(qt.scales.shape) != (out_f, n) or qmax is None or qmax.numel() != n \
                or qt.perm is None or qt.perm.numel() != in_f:
            raise ValueError(f"an {self.describe()} weight {out_f}x{in_f} needs scale codes "
                             f"({out_f}, {n}), q_scale_max ({n},) and a permutation ({in_f},)")

    def group_index(self, in_features: int, device: Any = None) -> torch.Tensor:
        raise ValueError("an EXL2 mix groups act-ordered rows; it has no per-column g_idx")

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        return dequantize_exl2(qt.codes, qt.scales, qt.aux["q_scale_max"], qt.perm, self)

    def storage_bits(self, qt: QuantizedTensor) -> int:
        """exllamav2's own count (FORMATS.md §4.6)."""
        out_f, in_f = self.shape(qt)
        return total_bits(self, in_f, out_f)

    def same_layout(self, a: QuantizedTensor, b: QuantizedTensor) -> bool:
        if a.perm is None or b.perm is None:
            return a.perm is None and b.perm is None
        return a.perm.dtype == b.perm.dtype and torch.equal(a.perm, b.perm)
