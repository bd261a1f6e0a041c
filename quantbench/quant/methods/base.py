"""The method interface every quantizer implements."""
from __future__ import annotations

from typing import ClassVar

import torch

from quantbench.config import GridConfig, IntGridConfig, MethodOptions, QuantizeConfig
from quantbench.errors import ConfigError
from quantbench.tensor import QuantizedTensor


class Method:
    """A way of choosing codes on a grid.

    Data-free methods implement ``quantize_weight``; data-driven ones (added with the
    calibration layer) also declare the statistics they need.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options_cls: ClassVar[type[MethodOptions]] = MethodOptions
    needs_calibration: ClassVar[bool] = False
    symmetric: ClassVar[bool] = True        # the grid kind implied when none is asked for
    default_bits: ClassVar[int] = 4
    default_group_size: ClassVar[int] = 128
    fixed_bits: ClassVar[int | None] = None  # methods defined at one width (nf4: 4, llm_int8: 8)
    native_format: ClassVar[str | None] = None  # the layout made for it, if only some can hold it
    gguf_capable: ClassVar[bool] = False     # can quantize onto GGUF block types (--type)
    device_capable: ClassVar[bool] = False   # quantize_with_stats runs on a GPU's tensors

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

    def quantize_weight(self, name: str, weight: torch.Tensor) -> QuantizedTensor:
        raise NotImplementedError
