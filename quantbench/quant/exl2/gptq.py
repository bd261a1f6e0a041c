"""GPTQ (and round-to-nearest) onto an EXL2 mix, as pure tensor functions.

Rows are taken in act-order (``diag(H)`` descending, as exllamav2 always does); the mix cuts
them into groups, widest codes first. GPTQ's shared column sweep
(:func:`quantbench.quant.gptq.column_sweep`) fits each group's scales on the error-updated
weights when the group starts (:func:`~quantbench.quant.exl2.grid.fit_group`, weighted by
``diag(H)``), rounds each column against them and spreads the error over the columns still
to come. The Hessian's factorisation can be prepared once and shared by every setting tried
on the same input (:func:`prepare_hessian`), as the measurement does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from quantbench.lazy import torch
from quantbench.quant.exl2.grid import RINT_MAGIC, fit_group, group_layout, scales_from_codes
from quantbench.quant.gptq import (GPTQStats, Upcoming, column_sweep,
                                   inverse_hessian_cholesky)
from quantbench.tensor import QuantizedTensor

if TYPE_CHECKING:
    from quantbench.quant.grids.exl2 import EXL2GridConfig


@dataclass(frozen=True)
class EXL2Params:
    damp_percent: float = 0.01
    block_size: int = 32   # lazy-batch width (same maths; 32 is fastest on CPU, stacked mixes)
    act_order: bool = True


@dataclass(frozen=True)
class PreparedHessian:
    perm: torch.Tensor        # processing order (act-order)
    hinv: torch.Tensor        # upper Cholesky factor of (H + λI)⁻¹, rows/cols in that order
    importance: torch.Tensor  # diag(H) in that order
    dead: torch.Tensor        # inputs that never saw a non-zero value (original order)
    damp: float
    damp_increased: bool


def prepare_hessian(hessian: torch.Tensor, params: EXL2Params = EXL2Params()
                    ) -> PreparedHessian:
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(H), descending=True) if params.act_order else \
        torch.arange(H.shape[0], device=H.device)
    H = H[perm][:, perm]
    hinv, damp, increased = inverse_hessian_cholesky(H, params.damp_percent)
    return PreparedHessian(perm, hinv, torch.diag(H).clone(), dead, damp, increased)


def exl2_quantize(weight: torch.Tensor, hessian: "torch.Tensor | PreparedHessian | None",
                  grid: EXL2GridConfig, params: EXL2Params = EXL2Params()
                  ) -> tuple[QuantizedTensor, GPTQStats]:
    """Quantize ``weight [out, in]`` onto the mix ``grid``: GPTQ given the input Hessian
    ``H = 2·XᵀX/n`` (or its :func:`prepare_hessian`), or round-to-nearest group by group when
    ``hessian`` is None (rows then in their original order)."""
    return exl2_quantize_many(weight, hessian, [grid], params)[0]


def exl2_quantize_many(weight: torch.Tensor, hessian: "torch.Tensor | PreparedHessian | None",
                       grids: list[EXL2GridConfig], params: EXL2Params = EXL2Params()
                       ) -> list[tuple[QuantizedTensor, GPTQStats]]:
    """:func:`exl2_quantize` of one weight onto several mixes in a single sweep: GPTQ's error
    feedback never crosses output rows, so a copy of the weight per mix is stacked and each
    copy's rows are fitted and rounded on their own mix (the same result as separate calls,
    with one column loop instead of one per mix)."""
    W0 = weight.float().clone()
    out_f, in_f = W0.shape
    prep = prepare_hessian(hessian, params) if isinstance(hessian, torch.Tensor) else hessian
    if prep is None:
        perm, importance = torch.arange(in_f, device=W0.device), None
    else:
        perm, importance = prep.perm.to(W0.device), prep.importance.to(W0.device)
        W0[:, prep.dead.to(W0.device)] = 0.0
    W = W0[:, perm].repeat(len(grids), 1)                       # [mixes·out, in]
    layouts = [group_layout(g, in_f) for g in grids]
    starts: dict[int, list[tuple[int, int, int, int]]] = {}
    for m, layout in enumerate(layouts):
        row = 0
        for index, (bits, rows) in enumerate(layout):
            starts.setdefault(row, []).append((m, index, bits, rows))
            row += rows
    qscale = [torch.zeros(out_f, len(l), dtype=torch.uint8, device=W.device) for l in layouts]
    qscale_max = [torch.zeros(len(l), dtype=torch.float16, device=W.device) for l in layouts]
    scale, lo, hi, zero = (torch.zeros(W.shape[0], device=W.device) for _ in range(4))
    state: dict[str, torch.Tensor | None] = {"dead": None}

    def fit(j: int, block: torch.Tensor) -> None:
        for m, index, bits, rows in starts[j]:
            r = slice(m * out_f, (m + 1) * out_f)
            qs, qsm = fit_group(block[r, :rows], bits, None if importance is None else
                                importance[j:j + rows])
            qscale[m][:, index], qscale_max[m][index] = qs, qsm
            scale[r] = scales_from_codes(qs, qsm).float()
            half = float(1 << (bits - 1))
            lo[r], hi[r], zero[r] = -half, half - 1, half
        state["dead"] = (scale == 0) if bool((scale == 0).any()) else None

    def round_col(w: torch.Tensor, j: int, upcoming: Upcoming) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
        if j in starts:
            fit(j, upcoming(max(rows for *_, rows in starts[j])))
        signed = (torch.clamp(w / scale.clamp_min(1e-30), lo, hi) + RINT_MAGIC) - RINT_MAGIC
        q = signed + zero
        if state["dead"] is not None:  # a channel whose scale is 0: the zero code
            q = torch.where(state["dead"], zero, q)
        return (signed * scale).to(torch.float16).float(), q

    if prep is None:
        q_proc, losses = _round_sweep(W, round_col)
    else:
        q_proc, losses = column_sweep(W, prep.hinv.to(W.device), params.block_size, round_col)
    damp, increased = (0.0, False) if prep is None else (prep.damp, prep.damp_increased)
    results = []
    for m, grid in enumerate(grids):
        codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=W.device)
        codes[:, perm] = q_proc[m * out_f:(m + 1) * out_f].to(torch.uint8)
        qt = QuantizedTensor(codes=codes, scales=qscale[m], zeros=None, grid=grid,
                             dtype=weight.dtype, perm=perm.to(torch.int32),
                             aux={"q_scale_max": qscale_max[m]})
        loss = float(losses[m * out_f:(m + 1) * out_f].sum())
        results.append((qt, GPTQStats(damp=damp, damp_increased=increased, proxy_error=loss)))
    return results


def _round_sweep(W: torch.Tensor, round_col) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest through the same ``round_col`` (no error feedback)."""
    codes = torch.empty_like(W)
    losses = torch.zeros(W.shape[0], device=W.device)
    for j in range(W.shape[1]):
        deq, q = round_col(W[:, j], j, lambda width, j=j: W[:, j:j + width])
        codes[:, j] = q
        losses += (W[:, j] - deq).square() / 2
    return codes, losses
