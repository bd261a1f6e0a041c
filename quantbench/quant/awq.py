"""AWQ as pure tensor functions: activation-aware scales and weight clipping.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"
(2023). For linears sharing an input ``x``, a per-input-channel scale ``s`` is chosen so that
``Q(W·diag(s))·diag(s)⁻¹`` reproduces the float output best; ``s`` is folded into whatever
produces ``x`` (a norm's weight, or the rows of a preceding linear), so the float model is
unchanged and only the rounding sees the rescaled weights. Then each weight group's range is
clipped to the value that minimises the group's output error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from quantbench.config import IntGridConfig
from quantbench.quant.grid import fake_quantize, group_index, pad_groups


def fake_quant(w: torch.Tensor, grid: IntGridConfig,
               scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Round-to-nearest onto ``grid`` and back (float32), as the written file would hold."""
    return fake_quantize(w, grid, scale_dtype)


def weight_magnitude(weights: Sequence[torch.Tensor], grid: IntGridConfig) -> torch.Tensor:
    """Mean over output rows of ``|w|`` normalised by its group's max: ``[in]``."""
    w = torch.cat([x.float() for x in weights], dim=0).abs()
    grouped = pad_groups(w, grid)
    norm = grouped / (grouped.amax(dim=2, keepdim=True) + 1e-6)
    return norm.reshape(w.shape[0], -1)[:, : w.shape[1]].mean(dim=0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratio: float
                     ) -> torch.Tensor:
    """``x_mean^α / w_mean^(1−α)`` (or ``x_mean^α`` without weight statistics), normalised so
    that ``max·min = 1``."""
    s = x_mean.pow(ratio)
    if w_mean is not None:
        s = s / (w_mean.pow(1 - ratio) + 1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@dataclass
class ScaleSearch:
    scales: torch.Tensor          # [in]; all ones when plain rounding was best
    ratio: float | None           # the chosen α, None for the identity
    losses: dict[float | None, float]  # output MSE per evaluated α (None: plain rounding)


def search_scales(x_mean: torch.Tensor, weights: Sequence[torch.Tensor], grid: IntGridConfig,
                  inspect: Callable[[list[torch.Tensor]], torch.Tensor],
                  reference: torch.Tensor, n_grid: int = 20, duo: bool = True,
                  exhaustive: bool = False) -> ScaleSearch:
    """Search α on the lattice {0, 1/n, …, (n−1)/n} (plus the identity, plain rounding).

    ``inspect(trial_weights)`` runs the module that consumes the linears' outputs with the
    given (fake-quantized, rescaled) weights and returns its output; ``reference`` is that
    output with the float weights. ``exhaustive`` evaluates every lattice point, as AWQ does;
    otherwise every ~n/5-th point is evaluated and the best one refined by walking to lattice
    neighbours while the loss falls — the same answer when the loss is unimodal in α, in
    about half the forward passes. Returns the scales with the smallest MSE."""
    x_mean = x_mean.float()
    w_mean = weight_magnitude(weights, grid) if duo else None
    losses: dict[float | None, float] = {}

    def loss(i: int | None) -> float:
        ratio = None if i is None else i / n_grid
        if ratio not in losses:
            s = None if i is None else candidate_scales(x_mean, w_mean, ratio)
            trial = [fake_quant(w.float() * s, grid) / s if s is not None
                     else fake_quant(w, grid) for w in weights]
            losses[ratio] = float((inspect(trial).float() - reference.float()).pow(2).mean())
        return losses[ratio]

    loss(None)
    step = 1 if exhaustive else max(1, n_grid // 5)
    best = min(range(0, n_grid, step), key=loss)
    while step > 1:
        moved = False
        for j in (best - 1, best + 1):
            if 0 <= j < n_grid and loss(j) < loss(best):
                best, moved = j, True
                break
        if not moved:
            break
    ratio = best / n_grid
    if losses[None] <= losses[ratio]:
        return ScaleSearch(torch.ones_like(x_mean), None, losses)
    return ScaleSearch(candidate_scales(x_mean, w_mean, ratio), ratio, losses)


def search_clip(w: torch.Tensor, x: torch.Tensor, grid: IntGridConfig, n_grid: int = 20,
                max_shrink: float = 0.5, row_batch: int = 512) -> torch.Tensor:
    """Per (row, group) clip value ``[rows, n_groups]`` minimising the group's output error
    ``Σ_t (x_t·Q(clamp(w))_g − x_t·w_g)²`` over the sampled inputs ``x`` ``[T, in]``."""
    w = w.float()
    xg = pad_groups(x.float(), grid).transpose(0, 1)          # [n_groups, T, g]
    out = torch.empty(w.shape[0], xg.shape[0])
    for r0 in range(0, w.shape[0], row_batch):
        wg = pad_groups(w[r0:r0 + row_batch], grid)           # [rows, n_groups, g]
        rows = wg.shape[0]
        ref = torch.bmm(xg, wg.permute(1, 2, 0))               # [n_groups, T, rows]
        org_max = wg.abs().amax(dim=2)                         # [rows, n_groups]
        best_err = torch.full_like(org_max, float("inf"))
        best = org_max.clone()
        for i in range(max(1, int(max_shrink * n_grid))):
            max_val = org_max * (1 - i / n_grid)
            bound = max_val.unsqueeze(-1)
            trial = torch.maximum(torch.minimum(wg, bound), -bound).reshape(rows, -1)
            q = pad_groups(fake_quantize(trial, grid), grid)
            err = (torch.bmm(xg, q.permute(1, 2, 0)) - ref).pow_(2).mean(dim=1).t()
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, max_val, best)
        out[r0:r0 + row_batch] = best
    return out


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, grid: IntGridConfig) -> torch.Tensor:
    bound = max_val.to(w.dtype)[:, group_index(w.shape[1], grid).long()]
    return torch.maximum(torch.minimum(w, bound), -bound)


def fold_scales(prev: torch.nn.Module, linears: Sequence[torch.nn.Module],
                scales: torch.Tensor) -> None:
    """``prev`` output ÷ s, consumers' input columns × s: the float function is unchanged.

    ``prev`` is a norm (its weight vector is divided) or a linear (its output rows and bias)."""
    s = scales.to(prev.weight.dtype)
    if prev.weight.dim() == 1:
        prev.weight.data.div_(s)
    else:
        prev.weight.data.div_(s.view(-1, 1))
    if getattr(prev, "bias", None) is not None:
        prev.bias.data.div_(s)
    for lin in linears:
        lin.weight.data.mul_(s.view(1, -1))
