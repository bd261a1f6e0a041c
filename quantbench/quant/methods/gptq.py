"""``gptq``: GPTQ on the shared calibration layer (Hessian collector, true-sequential)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from quantbench.calibration.attention import HeadHessians
from quantbench.config import CalibrationOptions, GridConfig, QuantizeConfig, SweepSettings
from quantbench.errors import ConfigError
from quantbench.lazy import torch
from quantbench.options import option
from quantbench.quant.gptq import GPTQParams, GPTQStats
from quantbench.quant.methods.base import Method
from quantbench.quant.methods.gguf import GGUFPlan
from quantbench.ranges import Range
from quantbench.registry import register_method
from quantbench.tensor import QuantizedTensor

log = logging.getLogger(__name__)

# GPTQ's dampening, as a fraction of the mean Hessian diagonal (EXL2's sweep takes the same)
DAMP = Range(0, 1, low_open=True, high_open=True)


@dataclass(frozen=True)
class GPTQOptions(CalibrationOptions):
    damp_percent: float = option(0.01, flag="--damp", allowed=DAMP, help="Dampening as a "
                                 "fraction of the mean Hessian diagonal.")
    block_size: int = option(128, allowed=Range(1, integer=True),
                             help="Columns per lazy-batch update.")
    act_order: bool = option(True, help="Columns by descending Hessian diagonal.")
    # measured better here (see README); --dynamic-groups for GPTQ's original
    static_groups: bool = option(True, off_flag="--dynamic-groups", help=(
        "Group scales fixed in original column order before act-order (no g_idx); "
        "--dynamic-groups: formed in processing order with a g_idx, the original GPTQ."))
    scale_search: bool = option(True, help="Shrink each group's range where that lowers the "
                                "diag(H)-weighted rounding error; off: plain min/max.")
    # None: on GGUF types, off on integer grids (measured there, not yet made the default)
    attention_values: bool | None = option(None, off_flag="--input-values", help=(
        "v_proj rows per kv head on the Hessian of the attention-weighted inputs they are read "
        "with (default on GGUF types; opt-in on integer grids), or on the plain input Hessian."))
    float_targets: bool = option(False, help=(
        "Fit each linear to the float model's outputs (GPTAQ's asymmetric calibration): "
        "inputs from the quantized model, targets W·x from the float model, so a layer also "
        "corrects the error earlier layers left; one more float forward per block. Opt-in: "
        "measured worse than plain GPTQ on both real models (README)."))

    def sweep(self) -> SweepSettings:
        return SweepSettings(self.act_order, self.static_groups, self.damp_percent)


@register_method("gptq")
class GPTQ(GGUFPlan, Method):
    """GPTQ onto any grid with a column rounder (``grid.gptq``): on integer grids, GPTQ as
    published; on a GGUF type (``--type Q4_K_M``), every block's parameters are fitted first
    by the codec's importance-weighted search (``diag H`` as the imatrix), then GPTQ's sweep
    picks the codes on that fixed grid (``gptq_gguf``)."""

    description = "GPTQ: Hessian-weighted error feedback, act-order, on calibration data"
    options_cls = GPTQOptions
    needs_calibration = True
    statistic = "hessian"
    gguf_capable = True
    device_capable = True  # integer grids solve on the GPU; GGUF codecs run on the CPU

    @staticmethod
    def wants_attention_values(config: QuantizeConfig) -> bool:
        """Whether value projections get one attention-weighted Hessian per kv head
        (``calibration/attention.py``): on grids whose rows can be swept apart
        (``grid.splits_rows``: per-row scales, or GGUF's per-row blocks), by the grid's
        default (on GGUF types, off on integer grids) unless the options say otherwise."""
        chosen = config.options.attention_values
        if not config.grid.splits_rows:
            return False
        return config.grid.attention_values_default if chosen is None else bool(chosen)

    @property
    def attention_values(self) -> bool:
        """Read by the calibration pipeline."""
        return self.wants_attention_values(self.config)

    @property
    def float_targets(self) -> float | None:  # type: ignore[override]
        """The dampening of the float-target solve (the sweep's own), or None when off."""
        o = self.config.options
        return o.damp_percent if o.float_targets else None

    @classmethod
    def check(cls, config: QuantizeConfig) -> None:
        o = config.options
        if o.attention_values and not config.grid.splits_rows:
            raise ConfigError("--attention-values sweeps v_proj per kv head, which needs a scale "
                              "per row; use a channel or group grid, or drop the flag")

    def quantize_weight(self, name: str, weight: torch.Tensor) -> QuantizedTensor:
        """Embeddings / lm_head (quantized before the blocks, no Hessian reaches them): the
        grid's own round-to-nearest fit (a GGUF type's RTN codec; min/max scales on an integer
        grid, e.g. ``awq --then gptq --quantize-lm-head``), said in the log: on a GGUF type
        this is llama.cpp's own treatment, on an integer grid the user asked for it."""
        grid = self.grid_for(name)
        if not self.planned:
            log.warning("%s: no Hessian reaches it (quantized before the blocks); "
                        "round-to-nearest on %s", name, grid.describe())
        return grid.rtn(weight)

    def _params(self) -> GPTQParams:
        o = self.config.options
        return GPTQParams(o.damp_percent, o.block_size, o.act_order, o.static_groups,
                          o.scale_search)

    def quantize_many_with_stats(self, names: list[str], weights: list[torch.Tensor],
                                 hessian: torch.Tensor) -> list[QuantizedTensor]:
        """Linears sharing an input (q/k/v, gate/up): those on one grid in one stacked sweep
        (``grid.gptq_many``: the same codes as one sweep each up to float summation order,
        with a third to a half fewer column steps), a linear alone on its grid by itself."""
        out: dict[str, QuantizedTensor] = {}
        by_grid: dict[GridConfig, list[int]] = {}
        for i, name in enumerate(names):
            by_grid.setdefault(self.grid_for(name), []).append(i)
        for grid, idx in by_grid.items():
            if len(idx) == 1:
                out[names[idx[0]]] = self.quantize_with_stats(names[idx[0]], weights[idx[0]],
                                                              hessian)
                continue
            results = grid.gptq_many([weights[i] for i in idx], hessian, self._params())
            for i, (qt, stats) in zip(idx, results):
                out[names[i]] = self._finish(names[i], qt, stats)
        return [out[name] for name in names]

    def _finish(self, name: str, qt: QuantizedTensor, stats) -> QuantizedTensor:
        if stats.damp_increased:
            log.warning("%s: Cholesky failed at %.2g%% damping; used %.3g", name,
                        100 * self.config.options.damp_percent, stats.damp)
        qt.meta.update({"gptq_damp": stats.damp, "gptq_proxy_error": stats.proxy_error})
        return qt

    def quantize_with_stats(self, name: str, weight: torch.Tensor,
                            hessian: torch.Tensor) -> QuantizedTensor:
        if isinstance(hessian, HeadHessians):
            return self._quantize_heads(name, weight, hessian)
        qt, stats = self.grid_for(name).gptq(weight, hessian, self._params())
        return self._finish(name, qt, stats)

    def _quantize_heads(self, name: str, weight: torch.Tensor,
                        hessians: HeadHessians) -> QuantizedTensor:
        """A value projection: each kv head's rows swept with its own attention-weighted
        Hessian and stacked back in order (``grid.gptq_rows``). On a GGUF type every head
        takes its own act-order (the block bytes are per row); on an integer grid the heads
        share the act-order of their summed Hessians, so the tensor keeps one
        ``g_idx``/``perm``. A fused projection (Phi-3's ``qkv_proj``) sweeps its other rows
        on the plain input Hessian (``HeadHessians.blocks``)."""
        rows, per_block = hessians.blocks(weight.shape[0])
        qt, stats = self.grid_for(name).gptq_rows(weight, rows, per_block, self._params())
        return self._finish(name, qt, GPTQStats(
            max(st.damp for st in stats), any(st.damp_increased for st in stats),
            sum(st.proxy_error for st in stats)))
