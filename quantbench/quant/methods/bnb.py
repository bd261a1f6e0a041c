"""The bitsandbytes family: ``nf4`` and ``fp4`` (blockwise 4-bit codebooks, data-free) and
``llm_int8`` (row-wise int8 weights; calibration data measures the activation outlier columns
its run-time decomposition will handle in 16-bit)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from quantbench.config import (CalibrationOptions, CodebookGridConfig, GridConfig,
                               Int8RowGridConfig, MethodOptions)
from quantbench.errors import ConfigError
from quantbench.lazy import torch
from quantbench.options import option
from quantbench.quant.methods.base import Method
from quantbench.ranges import Range
from quantbench.registry import register_method
from quantbench.tensor import QuantizedTensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FourBitOptions(MethodOptions):
    double_quant: bool = option(False, switch=True, help="Quantize the absmax values too "
                                "(bitsandbytes' double quant).")


class _FourBit(Method):
    options_cls = FourBitOptions
    codebook = "nf4"
    default_group_size = 64
    fixed_bits = 4
    native_format = "bitsandbytes"

    @classmethod
    def make_grid(cls, bits: int, group_size: int, symmetric: bool | None,
                  options: FourBitOptions) -> GridConfig:
        cls.refuse_other_widths(bits, symmetric)
        return CodebookGridConfig(cls.codebook, group_size, bool(options.double_quant))

    def quantize_weight(self, name: str, weight: torch.Tensor) -> QuantizedTensor:
        return self.config.grid.rtn(weight)


@register_method("nf4")
class NF4(_FourBit):
    description = "bitsandbytes NF4: blockwise absmax, 16 normal-quantile levels (QLoRA)"
    codebook = "nf4"


@register_method("fp4")
class FP4(_FourBit):
    description = "bitsandbytes FP4: blockwise absmax, 16 e2m1 floating-point levels"
    codebook = "fp4"


@dataclass(frozen=True)
class LLMInt8Options(CalibrationOptions):
    threshold: float = option(6.0, allowed=Range(0), help="Activation magnitude from which a "
                              "column runs in 16-bit at run time; 0: no decomposition.")
    calib_samples: int = 16


@register_method("llm_int8")
class LLMInt8(Method):
    description = ("LLM.int8: per-row int8 weights; at run time activation outlier columns "
                   "(|x| >= threshold) in 16-bit")
    options_cls = LLMInt8Options
    needs_calibration = True
    statistic = "act_absmax"
    default_bits = 8
    default_group_size = -1
    fixed_bits = 8
    native_format = "bitsandbytes"

    @classmethod
    def make_grid(cls, bits: int, group_size: int, symmetric: bool | None,
                  options: LLMInt8Options) -> GridConfig:
        cls.refuse_other_widths(bits, symmetric)
        if group_size != -1:
            raise ConfigError("llm_int8 scales each output row; drop --group-size "
                              "(or pass --group-size -1)")
        return Int8RowGridConfig()

    def quantize_with_stats(self, name: str, weight: torch.Tensor,
                            act_absmax: torch.Tensor) -> QuantizedTensor:
        threshold = self.config.options.threshold
        qt = Int8RowGridConfig().rtn(weight)   # LLM.int8 is defined on its own grid
        outliers = int((act_absmax >= threshold).sum()) if threshold > 0 else 0
        fraction = outliers / act_absmax.numel()
        log.info("%s: %d of %d input columns reach |x| >= %g (%.2f%%)", name, outliers,
                 act_absmax.numel(), threshold, 100 * fraction)
        qt.meta.update({"outlier_columns": outliers, "outlier_fraction": round(fraction, 6),
                        "act_absmax_max": round(float(act_absmax.max()), 4)})
        return qt
