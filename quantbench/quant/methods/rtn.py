"""Round-to-nearest on the integer grid: ``absmax`` (symmetric) and ``zeropoint``."""
from __future__ import annotations

from quantbench.config import GridConfig, QuantizeConfig
from quantbench.errors import ConfigError
from quantbench.lazy import torch
from quantbench.quant.grids.base import scale_dtype_for
from quantbench.quant.methods.base import Method
from quantbench.registry import register_method
from quantbench.tensor import QuantizedTensor


def rtn_quantize(weight: torch.Tensor, grid: GridConfig, scale_dtype: torch.dtype
                 ) -> QuantizedTensor:
    """Pure RTN: the grid's own round-to-nearest fit (``grid.rtn``)."""
    return grid.rtn(weight, scale_dtype=scale_dtype)


_scale_dtype = scale_dtype_for   # the name AWQ imports


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
        return self.config.grid.rtn(weight)


@register_method("absmax")
class AbsMax(_RTN):
    description = "round-to-nearest, symmetric: scale = absmax / (2^(b-1) - 0.5)"
    symmetric = True


@register_method("zeropoint")
class ZeroPoint(_RTN):
    description = "round-to-nearest with an integer zero-point over [min, max]"
    symmetric = False
