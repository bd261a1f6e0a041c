"""Frozen configuration dataclasses for grids, target selection and quantization runs.

Every config serialises with ``to_dict`` / ``from_dict`` and carries ``CONFIG_VERSION`` so a
manifest written today can be read (or refused with a clear message) by a later version.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Union

from quantbench.errors import ConfigError

CONFIG_VERSION = 1

GRANULARITIES = ("tensor", "channel", "group")


def _check_version(data: Mapping[str, Any], what: str) -> None:
    version = data.get("version", CONFIG_VERSION)
    if version > CONFIG_VERSION:
        raise ConfigError(
            f"{what} config version {version} is newer than this quantbench understands "
            f"({CONFIG_VERSION}); upgrade quantbench"
        )


@dataclass(frozen=True)
class IntGridConfig:
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
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}"
            )
        if self.granularity != "group":  # canonical CLI value: -1 channel, 0 tensor
            object.__setattr__(self, "group_size", -1 if self.granularity == "channel" else 0)
        elif self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ConfigError(
                    f"group size must be a positive integer, got {self.group_size!r}; "
                    "use -1 for per-channel or 0 for per-tensor"
                )

    @classmethod
    def from_group_size(cls, bits: int, group_size: int, symmetric: bool) -> "IntGridConfig":
        """CLI convention: ``-1`` per output channel, ``0`` per tensor, ``>0`` groups."""
        if group_size == -1:
            return cls(bits=bits, symmetric=symmetric, granularity="channel", group_size=-1)
        if group_size == 0:
            return cls(bits=bits, symmetric=symmetric, granularity="tensor", group_size=0)
        if group_size < -1:
            raise ConfigError(
                f"group size {group_size} is not valid; use a positive size, -1 (per-channel) "
                "or 0 (per-tensor)"
            )
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

    def n_groups(self, in_features: int) -> int:
        if self.granularity == "group":
            return -(-in_features // self.group_size)
        return 1

    def group_width(self, in_features: int) -> int:
        return self.group_size if self.granularity == "group" else in_features

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

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "IntGridConfig":
        _check_version(data, "grid")
        if data.get("kind", cls.kind) != cls.kind:
            raise ConfigError(f"expected an '{cls.kind}' grid, got {data.get('kind')!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


BNB_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
CODEBOOKS = ("nf4", "fp4")


@dataclass(frozen=True)
class CodebookGridConfig:
    """bitsandbytes 4-bit: the weight flattened row-major, cut into blocks of ``block_size``
    values (a final partial block allowed), one absmax per block, each value the nearest entry
    of the 16-value NF4 or FP4 table scaled by it. With ``double_quant`` the absmax values are
    themselves quantized (blocks of 256, 8-bit signed dynamic map, mean offset)."""

    codebook: str = "nf4"
    block_size: int = 64
    double_quant: bool = False

    kind: ClassVar[str] = "codebook"
    bits: ClassVar[int] = 4
    nested_block_size: ClassVar[int] = 256

    def __post_init__(self) -> None:
        if self.codebook not in CODEBOOKS:
            raise ConfigError(f"codebook must be one of {', '.join(CODEBOOKS)}, "
                              f"got {self.codebook!r}")
        if self.block_size not in BNB_BLOCK_SIZES or isinstance(self.block_size, bool):
            raise ConfigError(
                f"{self.codebook} block size {self.block_size!r} is not allowed; bitsandbytes "
                f"takes {', '.join(map(str, BNB_BLOCK_SIZES))} (--group-size 64 is the default)")

    @property
    def cli_group_size(self) -> int:
        return self.block_size

    def n_blocks(self, numel: int) -> int:
        return -(-numel // self.block_size)

    def check_shape(self, name: str, out_features: int, in_features: int) -> None:
        """Any 2-D shape works: blocks run over the flattened weight."""

    def describe(self) -> str:
        return f"{self.codebook} b{self.block_size}" + (" +dq" if self.double_quant else "")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CodebookGridConfig":
        _check_version(data, "grid")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Int8RowGridConfig:
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
        _check_version(data, "grid")
        return cls()


GGUF_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K",
                     "Q3_K", "Q4_K", "Q5_K", "Q6_K")
GGUF_MIXTURES = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S",
                 "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")


@dataclass(frozen=True)
class GGUFGridConfig:
    """A GGUF quantization: ``type`` is a mixture llama-quantize knows by name (``Q4_K_M``:
    per-tensor types chosen by llama.cpp's rules) for a run, or one ggml tensor type (``Q6_K``)
    for a single tensor. A tensor on this grid is held as its ggml block bytes, row by row."""

    type: str = "Q4_K_M"

    kind: ClassVar[str] = "gguf"

    def __post_init__(self) -> None:
        t = str(self.type).upper()
        if t not in GGUF_MIXTURES and t not in GGUF_TENSOR_TYPES:
            raise ConfigError(f"unknown GGUF type {self.type!r}; use one of "
                              f"{', '.join(GGUF_MIXTURES)}")
        object.__setattr__(self, "type", t)

    @property
    def bits(self) -> int:
        """The nominal width (Q4_K_M → 4, F16 → 16)."""
        digits = "".join(ch for ch in self.type.split("_")[0] if ch.isdigit())
        return int(digits) if digits else 32

    @property
    def cli_group_size(self) -> int:
        return 0

    def check_shape(self, name: str, out_features: int, in_features: int) -> None:
        """Rows that fit no block (not a multiple of 32) stay in F16, as llama.cpp does."""

    def describe(self) -> str:
        return f"GGUF {self.type}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": CONFIG_VERSION, "type": self.type}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GGUFGridConfig":
        _check_version(data, "grid")
        return cls(data.get("type", "Q4_K_M"))


EXL2_WIDTHS = (8, 6, 5, 4, 3, 2)


@dataclass(frozen=True)
class EXL2GridConfig:
    """EXL2 (exllamav2, FORMATS.md §4). One tensor's setting is a *mix*: bit widths in
    descending order, the share of input rows (in act-order) each covers and its group size,
    as exllamav2's ``QParams`` (``widths=(5, 4), proportions=(0.1, 0.9), group_sizes=(32,
    128)``). Per group and output column a 4-bit scale code ``qscale`` gives the scale
    ``qscale²·qscale_max/256`` (one ``qscale_max`` per group); codes are symmetric.

    A run's grid names a target ``bpw`` instead: the measured optimiser then gives every
    layer its own mix, and each tensor carries that mix as its grid."""

    widths: tuple[int, ...] = (4,)
    proportions: tuple[float, ...] = (1.0,)
    group_sizes: tuple[int, ...] = (128,)
    bpw: float | None = None

    kind: ClassVar[str] = "exl2"

    def __post_init__(self) -> None:
        for name in ("widths", "proportions", "group_sizes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.bpw is not None:
            if not isinstance(self.bpw, (int, float)) or not 1.0 < float(self.bpw) <= 16.0:
                raise ConfigError(f"EXL2 target bits per weight must be a number above 1, "
                                  f"got {self.bpw!r} (e.g. --bpw 4.65)")
            object.__setattr__(self, "bpw", float(self.bpw))
        if not self.widths or not len(self.widths) == len(self.proportions) == \
                len(self.group_sizes):
            raise ConfigError("an EXL2 mix needs one proportion and one group size per width")
        if any(b not in EXL2_WIDTHS for b in self.widths):
            raise ConfigError(f"EXL2 bit widths are {', '.join(map(str, EXL2_WIDTHS))}, got "
                              f"{list(self.widths)}")
        if list(self.widths) != sorted(set(self.widths), reverse=True):
            raise ConfigError(f"EXL2 widths must be distinct and descending (exllamav2's "
                              f"loader requires it), got {list(self.widths)}")
        if any(not p > 0 for p in self.proportions) or abs(sum(self.proportions) - 1) > 1e-6:
            raise ConfigError(f"EXL2 proportions must be positive and sum to 1, got "
                              f"{list(self.proportions)}")
        if any(not isinstance(g, int) or g < 32 or g % 32 for g in self.group_sizes):
            raise ConfigError(f"EXL2 group sizes must be multiples of 32 (exllamav2's kernels "
                              f"need it), got {list(self.group_sizes)}")

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
        from quantbench.quant.exl2.grid import group_layout

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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EXL2GridConfig":
        _check_version(data, "grid")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


GridConfig = Union[IntGridConfig, CodebookGridConfig, Int8RowGridConfig, GGUFGridConfig,
                   EXL2GridConfig]
GRIDS: dict[str, type] = {g.kind: g for g in (IntGridConfig, CodebookGridConfig,
                                              Int8RowGridConfig, GGUFGridConfig,
                                              EXL2GridConfig)}


def grid_from_dict(data: Mapping[str, Any]) -> GridConfig:
    kind = data.get("kind", IntGridConfig.kind)
    if kind not in GRIDS:
        raise ConfigError(f"unknown grid kind {kind!r}; this quantbench knows "
                          f"{', '.join(sorted(GRIDS))} (upgrade quantbench?)")
    return GRIDS[kind].from_dict(data)


@dataclass(frozen=True)
class TargetConfig:
    """Which tensors a run quantizes.

    By default every linear of the decoder blocks (as the architecture mapping lists them);
    ``include``/``exclude`` are regular expressions on module names (``re.search``);
    embeddings and lm_head are kept in the source dtype unless asked for.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    embeddings: bool = False
    lm_head: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "include": list(self.include),
            "exclude": list(self.exclude),
            "embeddings": self.embeddings,
            "lm_head": self.lm_head,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TargetConfig":
        return cls(
            include=tuple(data.get("include", ())),
            exclude=tuple(data.get("exclude", ())),
            embeddings=bool(data.get("embeddings", False)),
            lm_head=bool(data.get("lm_head", False)),
        )


@dataclass(frozen=True)
class MethodOptions:
    """Base of per-method option dataclasses; data-free RTN methods need none."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sweep(self) -> "SweepSettings | None":
        """The GPTQ column sweep that picked the codes (what the GPTQ and compressed-tensors
        configs record), or None for a method without one."""
        return None


@dataclass(frozen=True)
class SweepSettings:
    """What a checkpoint's quantization config says of a GPTQ sweep."""

    act_order: bool
    static_groups: bool
    damp_percent: float


@dataclass(frozen=True)
class CalibrationOptions(MethodOptions):
    """Options every calibrated method shares: which windows the calibration layer feeds it.
    Subclasses redeclare ``calib_samples`` for their own default."""

    calib_samples: int = 128
    calib_len: int = 512
    calib_seed: int = 0
    calib_data: str | None = None
    calib_chat_template: bool = False
    batch_size: int = 8
    device: str = "auto"  # where blocks, statistics and solves run: auto|cpu|cuda|cuda:N


@dataclass(frozen=True)
class QuantizeConfig:
    """One quantization run: method × grid × targets (+ the method's own options)."""

    method: str
    grid: GridConfig = field(default_factory=IntGridConfig)
    targets: TargetConfig = field(default_factory=TargetConfig)
    options: MethodOptions = field(default_factory=MethodOptions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CONFIG_VERSION,
            "method": self.method,
            "grid": self.grid.to_dict(),
            "targets": self.targets.to_dict(),
            "options": self.options.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantizeConfig":
        from quantbench.registry import get_method

        _check_version(data, "quantize")
        method_cls = get_method(data["method"])
        return cls(
            method=data["method"],
            grid=grid_from_dict(data.get("grid", {})),
            targets=TargetConfig.from_dict(data.get("targets", {})),
            options=method_cls.build_options(**data.get("options", {})),
        )
