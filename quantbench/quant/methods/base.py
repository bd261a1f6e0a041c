"""The method contract: every hook orchestration calls, declared once with its default.

Orchestration (``quant/run.py``, ``calibration/pipeline.py``, ``calibration/plan.py``,
``formats/io.py``, ``formats/gguf.py``) calls these and nothing else; a method overrides the
hooks it needs and inherits the documented default for the rest. A transform around an inner
method (AWQ's search before RTN or GPTQ) is a ``Transform`` (``methods/transform.py``) that
delegates what it does not change.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

from quantbench.config import GridConfig, IntGridConfig, MethodOptions, QuantizeConfig
from quantbench.errors import ConfigError
from quantbench.lazy import torch
from quantbench.options import option_fields
from quantbench.tensor import QuantizedTensor

if TYPE_CHECKING:
    from quantbench.calibration.blocks import BlockContext
    from quantbench.models.loader import Model


class Method:
    """A way of choosing codes on a grid.

    Data-free methods implement ``quantize_weight``; data-driven ones declare the
    ``statistic`` the calibration pipeline collects for them and implement
    ``quantize_with_stats``.
    """

    # -- what the method is (class level) ----------------------------------------------------
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options_cls: ClassVar[type[MethodOptions]] = MethodOptions
    symmetric: ClassVar[bool] = True        # the grid kind implied when none is asked for
    default_bits: ClassVar[int] = 4
    default_group_size: ClassVar[int] = 128
    fixed_bits: ClassVar[int | None] = None  # methods defined at one width (nf4: 4, llm_int8: 8)
    native_format: ClassVar[str | None] = None  # the layout made for it, if only some can hold it
    gguf_capable: ClassVar[bool] = False     # can quantize onto GGUF block types (--type)
    inner_methods: ClassVar[tuple[str, ...]] = ()  # what ``then`` may name (transforms only)

    # -- what orchestration asks of a run (a property where it depends on the options) -------
    needs_calibration: ClassVar[bool] = False  # run the block pipeline (else data-free)
    statistic: ClassVar[str | None] = None     # the collector the pipeline feeds (COLLECTORS)
    device_capable: ClassVar[bool] = False     # quantize_with_stats runs on a GPU's tensors
    attention_values: ClassVar[bool] = False   # value projections get per-kv-head statistics
    float_targets: ClassVar[float | None] = None  # GPTQ's float-model targets: its dampening
    has_imatrix: ClassVar[bool] = False        # llama.cpp's GGUF type rules see an imatrix

    # -- options ------------------------------------------------------------------------------
    @classmethod
    def option_names(cls, given: Mapping[str, Any] | None = None) -> set[str]:
        """The keyword options this method takes (``given``: the options chosen so far, for a
        transform whose inner method ``then`` decides the rest)."""
        return {f.name for f in option_fields(cls.options_cls)}

    @classmethod
    def check_options(cls, given: Mapping[str, Any],
                      flag: Callable[[str], str] = str) -> None:
        """Refuse an option this method does not take, in one line; ``flag`` renders an
        option's name (the CLI passes its flag names)."""
        from quantbench.registry import did_you_mean

        taken = cls.option_names(given)
        unknown = sorted(set(given) - taken)
        if unknown:
            hint = did_you_mean(unknown[0], taken, flag).strip()
            raise ConfigError(f"method {cls.name} takes no {flag(unknown[0])} option"
                              + (f"; {hint}" if hint else ""))

    @classmethod
    def build_options(cls, **given: Any) -> MethodOptions:
        """The options dataclass from flat keywords (API, CLI, recipes, a manifest's dict);
        a keyword the method lacks is one line naming it (and the near one it has)."""
        cls.check_options(given)
        return cls.options_cls(**given)

    # -- the grid -----------------------------------------------------------------------------
    @classmethod
    def make_grid(cls, bits: int, group_size: int, symmetric: bool | None,
                  options: MethodOptions) -> GridConfig:
        """The grid this method quantizes onto for the user's bits/group size/kind."""
        sym = cls.symmetric if symmetric is None else symmetric
        return IntGridConfig.from_group_size(bits, group_size, sym)

    @classmethod
    def refuse_other_widths(cls, bits: int, symmetric: bool | None) -> None:
        """For a method defined at one width without a zero-point (``fixed_bits``): refuse
        anything else the user asked for, saying which flag to drop."""
        if bits != cls.fixed_bits:
            raise ConfigError(f"{cls.name} stores {cls.fixed_bits}-bit codes; drop --bits "
                              f"(or pass --bits {cls.fixed_bits})")
        if symmetric is False:
            raise ConfigError(f"{cls.name} has no zero-point; drop --zero-point")

    def __init__(self, config: QuantizeConfig):
        self.check(config)
        self.config = config

    @classmethod
    def check(cls, config: QuantizeConfig) -> None:
        """Refuse a configuration this method cannot honour, before any work starts."""

    # -- before any work ----------------------------------------------------------------------
    def prepare(self, model: "Model", targets: list[str]) -> None:
        """Once the targets are known (a GGUF mixture resolved to a type per tensor, an EXL2
        measurement file found); default: nothing."""

    def grid_for(self, name: str) -> GridConfig:
        """The grid tensor ``name`` is quantized onto; default: the run's grid (a GGUF
        mixture's plan gives each tensor its own type)."""
        return self.config.grid

    def tensor_types(self) -> dict[str, str]:
        """The ggml type of every target in a GGUF run (after ``prepare``); default: none."""
        return {}

    def plan_costs(self, model: "Model", shapes: dict[str, tuple[int, int]], hidden: int,
                   tokens: int, fwd: float) -> dict[str, float]:
        """GFLOP of this method's own stages for ``convert --plan`` beyond the shared ones
        (capture, and the Hessian forwards/solves of a ``"hessian"`` statistic); ``fwd`` is
        one block forward over the ``tokens`` calibration tokens. Default: none."""
        return {}

    # -- per block ----------------------------------------------------------------------------
    def prepare_block(self, ctx: "BlockContext") -> None:
        """Calibrated: runs on the float block before its linears are quantized (AWQ rescales
        and clips there); default: nothing."""

    def transform_block(self, model: "Model", index: int, tensors: dict[str, torch.Tensor]
                        ) -> dict[str, torch.Tensor]:
        """Data-free: one block's named tensors before quantization (re-applying a saved AWQ
        search); default: unchanged."""
        return tensors

    # -- choosing codes -----------------------------------------------------------------------
    def quantize_weight(self, name: str, weight: torch.Tensor) -> QuantizedTensor:
        """One weight without calibration statistics (data-free runs; embeddings and lm_head
        of calibrated ones)."""
        raise NotImplementedError

    def quantize_with_stats(self, name: str, weight: torch.Tensor, stat: Any) -> QuantizedTensor:
        """One block linear with its ``statistic`` (None when the method declares none);
        default: ``quantize_weight`` when there is no statistic."""
        if stat is not None:
            raise NotImplementedError(f"{self.name} collects no statistic")
        return self.quantize_weight(name, weight)

    def quantize_many_with_stats(self, names: list[str], weights: list[torch.Tensor],
                                 stat: Any) -> list[QuantizedTensor] | None:
        """Linears sharing one input (and statistic) in one call; None (the default): the
        pipeline quantizes them one by one with ``quantize_with_stats``."""
        return None

    # -- after the last block -----------------------------------------------------------------
    def gguf_metadata(self) -> list[tuple[str, Any, str]]:
        """Extra GGUF key/values ``(key, value, GGUFValueType name)``; default: none."""
        return []

    def side_files(self, directory: Path) -> list[str]:
        """Write the method's own files beside the weights (any format) once every block was
        quantized; return their names. Default: none."""
        return []
