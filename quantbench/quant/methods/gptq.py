"""``gptq``: GPTQ on the shared calibration layer (Hessian collector, true-sequential)."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from quantbench.calibration.attention import HeadHessians
from quantbench.config import CalibrationOptions, QuantizeConfig, SweepSettings
from quantbench.errors import ConfigError
from quantbench.quant.gguf.gptq_grid import gptq_gguf, gptq_gguf_rows
from quantbench.quant.gptq import (GPTQParams, GPTQStats, act_order, gptq_quantize,
                                   gptq_quantize_many, stack_rows)
from quantbench.quant.methods.base import Method
from quantbench.quant.methods.gguf import GGUFPlan, gguf_tensor
from quantbench.quant.methods.rtn import _scale_dtype, rtn_quantize
from quantbench.registry import register_method
from quantbench.tensor import QuantizedTensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQOptions(CalibrationOptions):
    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = True  # measured better here (see README); --dynamic-groups for GPTQ's original
    scale_search: bool = True   # shrink group ranges where diag(H)-weighted error drops
    # v_proj per kv head on attention-weighted Hessians; None: on GGUF types, off on integer
    # grids (measured there, not yet made the default)
    attention_values: bool | None = None

    def sweep(self) -> SweepSettings:
        return SweepSettings(self.act_order, self.static_groups, self.damp_percent)


@register_method("gptq")
class GPTQ(GGUFPlan, Method):
    """On integer grids, GPTQ as published; on a GGUF type (``--type Q4_K_M``), every block's
    parameters are fitted first by the codec's importance-weighted search (``diag H`` as the
    imatrix), then GPTQ's sweep picks the codes on that fixed grid (``gptq_gguf``)."""

    description = "GPTQ: Hessian-weighted error feedback, act-order, on calibration data"
    options_cls = GPTQOptions
    needs_calibration = True
    statistic = "hessian"
    gguf_capable = True
    device_capable = True  # integer grids solve on the GPU; GGUF codecs run on the CPU

    @staticmethod
    def wants_attention_values(config: QuantizeConfig) -> bool:
        """Whether value projections get one attention-weighted Hessian per kv head
        (``calibration/attention.py``): by default on GGUF types, when asked on integer grids
        with per-row scales (the heads then share one act-order, so one ``g_idx``)."""
        chosen = config.options.attention_values
        if config.grid.kind == "gguf":
            return chosen is not False
        return bool(chosen) and config.grid.kind == "int" and config.grid.granularity != "tensor"

    @property
    def attention_values(self) -> bool:
        """Read by the calibration pipeline."""
        return self.wants_attention_values(self.config)

    @classmethod
    def check(cls, config: QuantizeConfig) -> None:
        o = config.options
        if not 0 < o.damp_percent < 1:
            raise ConfigError(f"damp_percent must be in (0, 1), got {o.damp_percent}")
        if o.block_size < 1:
            raise ConfigError(f"GPTQ block size must be >= 1, got {o.block_size}")
        if o.attention_values and config.grid.kind == "int" and \
                config.grid.granularity == "tensor":
            raise ConfigError("--attention-values sweeps v_proj per kv head, which needs a scale "
                              "per row; use a channel or group grid, or drop the flag")

    def quantize_weight(self, name: str, weight: torch.Tensor) -> QuantizedTensor:
        """Embeddings / lm_head (quantized before the blocks, no Hessian): the GGUF type's own
        RTN codec, or round-to-nearest with min/max scales on an integer grid."""
        if self.config.grid.kind != "gguf":
            return rtn_quantize(weight, self.config.grid, _scale_dtype(weight.dtype))
        return self.quantize_gguf(name, weight)

    def _params(self) -> GPTQParams:
        o = self.config.options
        return GPTQParams(o.damp_percent, o.block_size, o.act_order, o.static_groups,
                          o.scale_search)

    def quantize_many_with_stats(self, names: list[str], weights: list[torch.Tensor],
                                 hessian: torch.Tensor) -> list[QuantizedTensor] | None:
        """Linears sharing an input (q/k/v, gate/up) in one sweep on integer grids (the same
        codes as one sweep each, with a third to a half fewer column steps); None elsewhere."""
        if self.config.grid.kind == "gguf":
            return self._quantize_many_gguf(names, weights, hessian)
        if self.config.grid.kind != "int":
            return None
        dtype = weights[0].dtype
        scale_dtype = _scale_dtype(dtype)
        out = []
        for name, (qt, stats) in zip(names, gptq_quantize_many(
                weights, hessian, self.config.grid, self._params(), scale_dtype)):
            out.append(self._finish(name, qt, stats))
        return out

    def _quantize_many_gguf(self, names: list[str], weights: list[torch.Tensor],
                            hessian: torch.Tensor) -> list[QuantizedTensor]:
        """Linears of one ggml type stacked into one sweep (per-row block fits, so the same
        bytes as one sweep each up to float summation order); others one by one."""
        out: dict[str, QuantizedTensor] = {}
        by_type: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            by_type.setdefault(self.tensor_type(name), []).append(i)
        for ggml_type, idx in by_type.items():
            if len(idx) == 1:
                out[names[idx[0]]] = self.quantize_with_stats(names[idx[0]], weights[idx[0]],
                                                              hessian)
                continue
            stacked = torch.cat([weights[i].cpu().float() for i in idx])
            data, stats, losses = gptq_gguf_rows(stacked, hessian.cpu(), ggml_type,
                                                 self._params())
            row = 0
            for i in idx:
                rows = slice(row, row + int(weights[i].shape[0]))
                row = rows.stop
                qt = gguf_tensor(data[rows].clone(), ggml_type, weights[i].dtype)
                out[names[i]] = self._finish(names[i], qt, dataclasses.replace(
                    stats, proxy_error=float(losses[rows].sum())))
        return [out[name] for name in names]

    def _finish(self, name: str, qt: QuantizedTensor, stats) -> QuantizedTensor:
        if stats.damp_increased:
            log.warning("%s: Cholesky failed at %.2g%% damping; used %.3g", name,
                        100 * self.config.options.damp_percent, stats.damp)
        qt.meta.update({"gptq_damp": stats.damp, "gptq_proxy_error": stats.proxy_error})
        return qt

    def quantize_with_stats(self, name: str, weight: torch.Tensor,
                            hessian: torch.Tensor) -> QuantizedTensor:
        params = self._params()
        if isinstance(hessian, HeadHessians):
            return self._quantize_heads(name, weight, hessian)
        if self.config.grid.kind == "gguf":
            ggml_type = self.tensor_type(name)
            data, stats = gptq_gguf(weight.cpu(), hessian.cpu(), ggml_type, params)
            qt = gguf_tensor(data, ggml_type, weight.dtype)
        else:
            qt, stats = gptq_quantize(weight, hessian, self.config.grid, params,
                                      _scale_dtype(weight.dtype))
        return self._finish(name, qt, stats)

    def _quantize_heads(self, name: str, weight: torch.Tensor,
                        hessians: HeadHessians) -> QuantizedTensor:
        """A value projection: each kv head's rows swept with its own attention-weighted
        Hessian and stacked back in order. On a GGUF type every head takes its own act-order
        (the block bytes are per row); on an integer grid the heads share the act-order of
        their summed Hessians, so the tensor keeps one ``g_idx``/``perm``."""
        params = self._params()
        rows = hessians.rows(weight.shape[0])
        stats = []
        if self.config.grid.kind == "gguf":
            ggml_type = self.tensor_type(name)
            parts = []
            for r, h in zip(rows, hessians.per_head.cpu()):
                data, st = gptq_gguf(weight[r].cpu(), h, ggml_type, params)
                parts.append(data)
                stats.append(st)
            qt = gguf_tensor(torch.cat(parts), ggml_type, weight.dtype)
        else:
            order = act_order(hessians.per_head.sum(0), params)
            scale_dtype = _scale_dtype(weight.dtype)
            pieces = []
            for r, h in zip(rows, hessians.per_head.to(weight.device)):
                piece, st = gptq_quantize(weight[r], h, self.config.grid, params, scale_dtype,
                                          order)
                pieces.append(piece)
                stats.append(st)
            qt = stack_rows(pieces)
        return self._finish(name, qt, GPTQStats(
            max(st.damp for st in stats), any(st.damp_increased for st in stats),
            sum(st.proxy_error for st in stats)))
