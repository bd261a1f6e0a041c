"""The method interface every quantizer implements."""
from __future__ import annotations

from typing import ClassVar

import torch

from quantbench.config import MethodOptions, QuantizeConfig
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

    def __init__(self, config: QuantizeConfig):
        self.check(config)
        self.config = config

    @classmethod
    def check(cls, config: QuantizeConfig) -> None:
        """Refuse a configuration this method cannot honour, before any work starts."""

    def quantize_weight(self, name: str, weight: torch.Tensor) -> QuantizedTensor:
        raise NotImplementedError
