"""The grid contract, its registry and the config version every serialised config carries.

A *grid* says which numbers are representable (an integer grid per group, the NF4 codebook, a
GGUF block type, an EXL2 mix) and owns everything methods and formats ask of it: the shape
check and description, ``to_dict``/``from_dict``, a round-to-nearest fit (:meth:`Grid.rtn`),
GPTQ's sweep onto it (:meth:`Grid.gptq`), and — for a :class:`~quantbench.tensor.QuantizedTensor`
on it — validation of the stored parts, the logical shape, ``dequantize`` and the storage bit
count. Built-in grids register themselves with :func:`register_grid` under their ``kind``;
:func:`grid_from_dict` reads any registered kind back.

Imports flow one way: ``config`` → ``quant.grids`` → the pure maths modules; nothing here
imports ``quantbench.config``.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence, TypeVar

from quantbench.errors import ConfigError
from quantbench.finite import count_non_finite
from quantbench.lazy import torch

if TYPE_CHECKING:
    from quantbench.quant.gptq import GPTQStats
    from quantbench.tensor import QuantizedTensor

CONFIG_VERSION = 1

G = TypeVar("G", bound="type[Grid]")

GRIDS: dict[str, type["Grid"]] = {}   # kind → grid class (every registered grid)


def check_version(data: Mapping[str, Any], what: str) -> None:
    """Refuse a config written by a newer quantbench (``version`` above ours)."""
    version = data.get("version", CONFIG_VERSION)
    if version > CONFIG_VERSION:
        raise ConfigError(
            f"{what} config version {version} is newer than this quantbench understands "
            f"({CONFIG_VERSION}); upgrade quantbench"
        )


def register_grid(cls: G) -> G:
    """Class decorator: make ``cls`` readable by :func:`grid_from_dict` under ``cls.kind``."""
    kind = cls.kind
    if not kind:
        raise ValueError(f"grid {cls.__name__} has no kind")
    if kind in GRIDS and GRIDS[kind] is not cls:
        raise ValueError(f"grid kind {kind!r} is already registered by "
                         f"{GRIDS[kind].__name__}")
    GRIDS[kind] = cls
    return cls


def grid_from_dict(data: Mapping[str, Any]) -> "Grid":
    """The grid a ``to_dict`` wrote (``kind`` absent: the integer grid)."""
    kind = data.get("kind", "int")
    if kind not in GRIDS:
        raise ConfigError(f"unknown grid kind {kind!r}; this quantbench knows "
                          f"{', '.join(sorted(GRIDS))} (upgrade quantbench?)")
    return GRIDS[kind].from_dict(data)


def scale_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The dtype scales are stored in for a weight of ``dtype``: its own when half, else fp16."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def packed_bits(qt: "QuantizedTensor", code_bits: float) -> int:
    """Bits of a 2-D tensor stored as packed codes plus its scales, aux tensors, zero codes
    (``code_bits`` each) and, for a reordered tensor, its int32 ``g_idx``."""
    return count_bits(qt.numel, code_bits, qt.scales.numel() * qt.scales.element_size() * 8,
                      sum(t.numel() * t.element_size() * 8 for t in qt.aux.values()),
                      qt.zeros.numel() if qt.zeros is not None else 0,
                      qt.g_idx.numel() if qt.g_idx is not None and qt.perm is not None else 0)


def count_bits(numel: int, code_bits: float, scale_bits: int, aux_bits: int = 0,
               n_zeros: int = 0, n_g_idx: int = 0) -> int:
    """:func:`packed_bits` from the parts' sizes (what ``inspect`` counts from file headers):
    ``numel`` codes and ``n_zeros`` zero codes of ``code_bits`` each, the scales' and aux
    tensors' bits, ``n_g_idx`` int32 group indices."""
    bits = numel * code_bits + scale_bits + aux_bits
    if n_zeros:
        bits += n_zeros * code_bits
    if n_g_idx:
        bits += n_g_idx * 32
    return bits


def check_group_scales(qt: "QuantizedTensor", n_groups: int, describe: str) -> None:
    """Scales ``[out or 1, n_groups]`` (any group count when ``g_idx`` says where they go)."""
    rows, groups = qt.scales.shape
    check_scale_shape(rows, groups, qt.codes.shape[0], n_groups, qt.g_idx is not None, describe)


def check_scale_shape(rows: int, groups: int, out_features: int, n_groups: int,
                      has_g_idx: bool, describe: str) -> None:
    """:func:`check_group_scales` from the sizes alone (what ``inspect`` has: headers)."""
    if rows not in (1, out_features):
        raise ValueError("scales rows must be 1 or out_features")
    if groups != n_groups and not has_g_idx:
        raise ValueError(f"scales have {groups} groups, grid {describe} needs {n_groups}")


class Grid:
    """Base of every grid. Subclasses are frozen dataclasses with a ``kind``; each hook has a
    default that fits a grid of codes with per-row scales, overridden where a grid differs.

    Hooks a :class:`~quantbench.tensor.QuantizedTensor` calls take one 2-D tensor ``qt``
    (a stacked tensor calls them once per slice)."""

    kind: ClassVar[str] = ""

    # -- description and serialisation ---------------------------------------------------------

    def check_shape(self, name: str, out_features: int, in_features: int) -> None:
        """Refuse a grid that cannot work for a weight of this shape, before any work."""

    def describe(self) -> str:
        return self.kind

    @property
    def cli_group_size(self) -> int:
        """The ``--group-size`` that names this grid's granularity (0: none)."""
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Grid":
        check_version(data, "grid")
        if data.get("kind", cls.kind) != cls.kind:
            raise ConfigError(f"expected an '{cls.kind}' grid, got {data.get('kind')!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    # -- what a method asks -------------------------------------------------------------------

    #: GPTQ may sweep row blocks of one weight on different Hessians and stack them back
    #: (a scale per row): what attention-weighted value sweeps need.
    splits_rows: ClassVar[bool] = False
    #: Value projections get attention-weighted Hessians unless the user says otherwise.
    attention_values_default: ClassVar[bool] = False
    #: The round-to-nearest fit weighs an importance vector (llama.cpp's imatrix).
    weighs_importance: ClassVar[bool] = False

    def plan(self, model: Any, targets: Sequence[str], has_imatrix: bool = False
             ) -> dict[str, "Grid"]:
        """Per-tensor grids when this grid names a rule over a model (a GGUF mixture);
        empty when every tensor takes this grid itself."""
        return {}

    def search_proxy(self) -> "Grid | None":
        """The integer grid with per-group or per-channel scales that a search fitting such
        scales (AWQ's scale and clip searches) stands in for this grid with; None when there
        is none (float types, codebooks, per-tensor scales)."""
        return None

    def rtn(self, weight: torch.Tensor, *, scale_dtype: torch.dtype | None = None,
            importance: torch.Tensor | None = None) -> "QuantizedTensor":
        """Round-to-nearest with the grid's own fit. ``scale_dtype``: where a grid stores
        float scales (default :func:`scale_dtype_for` the weight's dtype); ``importance``
        ``[in]``: for grids whose fit weighs it (:attr:`weighs_importance`), else ignored."""
        raise ConfigError(f"{self.describe()} has no round-to-nearest fit")

    def gptq(self, weight: torch.Tensor, hessian: torch.Tensor, params: Any,
             order: torch.Tensor | None = None) -> tuple["QuantizedTensor", "GPTQStats"]:
        """GPTQ's column sweep onto this grid given ``H = 2·XᵀX/n``; ``order`` is a column
        order to use instead of ``H``'s own act-order, where the grid takes one."""
        raise ConfigError(f"GPTQ has no column rounder for {self.describe()}")

    def gptq_many(self, weights: list[torch.Tensor], hessian: torch.Tensor, params: Any
                  ) -> list[tuple["QuantizedTensor", "GPTQStats"]]:
        """:meth:`gptq` of weights that share one input (q/k/v, gate/up); grids that can
        sweep them stacked in one column loop override this."""
        return [self.gptq(w, hessian, params) for w in weights]

    def gptq_rows(self, weight: torch.Tensor, rows: list[slice], hessians: torch.Tensor,
                  params: Any) -> tuple["QuantizedTensor", list["GPTQStats"]]:
        """Row blocks ``weight[rows[i]]`` each swept on its own Hessian ``hessians[i]`` and
        stacked back (:attr:`splits_rows` grids)."""
        raise ConfigError(f"{self.describe()} cannot sweep row blocks on separate Hessians; "
                          "use a channel or group grid")

    # -- what a QuantizedTensor asks (one 2-D tensor) ------------------------------------------

    def validate(self, qt: "QuantizedTensor") -> None:
        """Raise ValueError when the stored parts do not fit this grid."""
        check_group_scales(qt, self.n_groups(qt.codes.shape[1]), self.describe())

    def non_finite_parts(self, qt: "QuantizedTensor") -> list[str]:
        """The stored float parts of ``qt`` holding NaN/Inf (``scales``, float ``aux``
        tensors): what a fit from non-finite statistics, or scales beyond their storage
        dtype's range, leaves. Grids that keep their scales inside the codes override it."""
        parts = {"scales": qt.scales, **{f"aux[{k!r}]": v for k, v in qt.aux.items()}}
        return [name for name, t in parts.items() if count_non_finite(t)]

    def n_groups(self, in_features: int) -> int:
        return 1

    def group_index(self, in_features: int, device: Any = None) -> torch.Tensor:
        """Group of each input column in original order (int32 ``[in]``): one group a row."""
        return torch.zeros(in_features, dtype=torch.int32, device=device)

    def shape(self, qt: "QuantizedTensor") -> tuple[int, int]:
        """The logical ``(out, in)`` of the weight the stored codes hold."""
        return tuple(qt.codes.shape)  # type: ignore[return-value]

    def dequantize(self, qt: "QuantizedTensor") -> torch.Tensor:
        """The float32 weight ``[out, in]``."""
        raise NotImplementedError(f"{self.describe()} cannot dequantize")

    def storage_bits(self, qt: "QuantizedTensor") -> int:
        """Bits a packed checkpoint spends on ``qt`` (codes of ``self.bits`` each)."""
        return packed_bits(qt, self.bits)  # type: ignore[attr-defined]

    def same_layout(self, a: "QuantizedTensor", b: "QuantizedTensor") -> bool:
        """What :meth:`QuantizedTensor.equal` compares beyond codes, scales, zeros and aux."""
        return True
