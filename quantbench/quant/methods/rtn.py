"""Round-to-nearest on the integer grid: ``absmax`` (symmetric) and ``zeropoint``."""
from __future__ import annotations

import torch

from quantbench.config import QuantizeConfig
from quantbench.errors import ConfigError
from quantbench.quant.grid import fit_scales, quantize_codes
from quantbench.quant.methods.base import Method
from quantbench.registry import register_method
from quantbench.tensor import QuantizedTensor


def rtn_quantize(weight: torch.Tensor, grid, scale_dtype: torch.dtype) -> QuantizedTensor:
    """Pure RTN: fit per-group scales (and zeros) from min/max, round every weight."""
    scales, zeros = fit_scales(weight, grid, scale_dtype)
    codes = quantize_codes(weight, scales, zeros, grid)
    return QuantizedTensor(codes=codes, scales=scales, zeros=zeros, grid=grid, dtype=weight.dtype)


def _scale_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


class _RTN(Method):
    symmetric: bool = True

    @classmethod
    def check(cls, config: QuantizeConfig) -> None:
        if config.grid.symmetric != cls.symmetric:
            other = "zeropoint" if cls.symmetric else "absmax"
            kind = "symmetric" if cls.symmetric else "zero-point"
            raise ConfigError(
                f"method {cls.name} is {kind} by definition; use --method {other} for the other grid"
            )

    def quantize_weight(self, name: str, weight: torch.Tensor) -> QuantizedTensor:
        return rtn_quantize(weight, self.config.grid, _scale_dtype(weight.dtype))


@register_method("absmax")
class AbsMax(_RTN):
    description = "round-to-nearest, symmetric: scale = absmax / (2^(b-1) - 0.5)"
    symmetric = True


@register_method("zeropoint")
class ZeroPoint(_RTN):
    description = "round-to-nearest with an integer zero-point over [min, max]"
    symmetric = False
