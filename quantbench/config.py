"""Frozen configuration dataclasses for target selection and quantization runs, and the grids
(defined in ``quant/grids/``) re-exported.

Every config serialises with ``to_dict`` / ``from_dict`` and carries ``CONFIG_VERSION`` so a
manifest written today can be read (or refused with a clear message) by a later version.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

# Grids live in quant/grids/ (one registered class each); re-exported here for every
# ``from quantbench.config import IntGridConfig`` and for manifests' ``grid_from_dict``.
from quantbench.quant.grids import (BNB_BLOCK_SIZES, CODEBOOKS, CONFIG_VERSION,  # noqa: F401
                                    EXL2_WIDTHS, GGUF_MIXTURES, GGUF_TENSOR_TYPES,
                                    GRANULARITIES, GRIDS, CodebookGridConfig, EXL2GridConfig,
                                    GGUFGridConfig, Grid, GridConfig, Int8RowGridConfig,
                                    IntGridConfig, grid_from_dict)
from quantbench.errors import ConfigError
from quantbench.options import check_values, option
from quantbench.quant.grids import check_version as _check_version
from quantbench.ranges import Range

__all__ = ["BNB_BLOCK_SIZES", "CODEBOOKS", "CONFIG_VERSION", "EXL2_WIDTHS", "GGUF_MIXTURES",
           "GGUF_TENSOR_TYPES", "GRANULARITIES", "GRIDS", "CalibrationOptions",
           "CodebookGridConfig", "EXL2GridConfig", "GGUFGridConfig", "Grid", "GridConfig",
           "Int8RowGridConfig", "IntGridConfig", "MethodOptions", "QuantizeConfig",
           "TargetConfig", "grid_from_dict"]


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

    def __post_init__(self) -> None:
        """Patterns checked when the selection is made (CLI, recipe, API, manifest), before
        any work; one pattern given as a string is a tuple of one (not of its characters)."""
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
            object.__setattr__(self, name, patterns)
            for pattern in patterns:
                _check_pattern(name, pattern)

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


def _check_pattern(name: str, pattern: object) -> None:
    """A module-name pattern that ``re.search`` can use, or one line saying why not."""
    if not isinstance(pattern, str):
        raise ConfigError(f"--{name} patterns are regular expressions (strings), got "
                          f"{pattern!r}")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"--{name} pattern {pattern!r} is not a valid regular expression "
                          f"({exc}); escape special characters with a backslash (e.g. "
                          r"'mlp\.down_proj') or fix the pattern") from exc


@dataclass(frozen=True)
class MethodOptions:
    """Base of per-method option dataclasses; data-free RTN methods need none."""

    def __post_init__(self) -> None:
        check_values(self)  # every number within its declared Range, whoever built it

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


# What the calibration layer can sample (``calibration/data.py`` checks its spec with these too)
CALIB_SAMPLES = Range(1, integer=True)
CALIB_LEN = Range(8, integer=True)


@dataclass(frozen=True)
class CalibrationOptions(MethodOptions):
    """Options every calibrated method shares: which windows the calibration layer feeds it.
    Subclasses redeclare ``calib_samples`` for their own default."""

    calib_samples: int = option(128, allowed=CALIB_SAMPLES, help="Calibration windows.")
    calib_len: int = option(512, allowed=CALIB_LEN, help="Tokens per window.")
    calib_seed: int = option(0, flag="--seed", allowed=Range(integer=True),
                             help="Sampling seed.")
    calib_data: str | None = option(None, help="Calibration text: .txt, .jsonl, or "
                                    "hf:NAME[:CONFIG[:SPLIT]] (default: the bundled C4 sample).")
    calib_chat_template: bool = option(False, switch=True, help="Wrap each calibration "
                                       "document in the tokenizer's chat template.")
    batch_size: int = option(8, cli=False, allowed=Range(1, integer=True),
                             help="Calibration windows per forward batch.")
    device: str = option("auto", help="Where blocks, statistics and solves run: auto (a CUDA "
                         "GPU when torch sees one, else cpu), cpu, cuda, cuda:N.")
    expert_min_tokens: int = option(16, allowed=Range(0, integer=True), help=(
        "Mixture-of-experts models: an expert routed fewer calibration tokens than this in a "
        "layer takes its statistics from all of that layer's tokens instead (force-routing); "
        "the manifest lists each layer's coverage."))
    router_weighted: bool = option(False, off_flag="--no-router-weighted", help=(
        "Mixture-of-experts models: each routed token counts in an expert's Hessian by its "
        "squared router weight (the expert's output is scaled by it); off (the default, "
        "measured lower KLD on the upcycled MoE, README): every routed token alike."))


@dataclass(frozen=True)
class QuantizeConfig:
    """One quantization run: method × grid × targets (+ the method's own options).

    ``group_size_open``: the grid's group size is the method's default, not one the user asked
    for, so ``quant.run.quantize`` may lower it to one that divides the model's rows
    (``fit_group_size``). A property of how the config was made, not of the run: it is not
    serialised and not compared."""

    method: str
    grid: GridConfig = field(default_factory=IntGridConfig)
    targets: TargetConfig = field(default_factory=TargetConfig)
    options: MethodOptions = field(default_factory=MethodOptions)
    group_size_open: bool = field(default=False, compare=False, repr=False)

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
