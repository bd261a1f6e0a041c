"""AWQ as pure tensor functions: activation-aware scales and weight clipping.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"
(2023). For linears sharing an input ``x``, a per-input-channel scale ``s`` is chosen so that
``Q(W·diag(s))·diag(s)⁻¹`` reproduces the float output best; ``s`` is folded into whatever
produces ``x`` (a norm's weight, or the rows of a preceding linear), so the float model is
unchanged and only the rounding sees the rescaled weights. Then each weight group's range is
clipped to the value that minimises the group's output error.

Everything here runs on the device of its inputs (CPU or GPU) and allocates nothing
elsewhere; the inner loops work on the grouped view ``[..., n_groups, g]`` with as few
full-size passes as the maths allows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from quantbench.lazy import torch
from quantbench.quant.grid import _smallest_positive, fake_quantize, group_index, pad_groups

if TYPE_CHECKING:
    from quantbench.quant.grids.int import IntGridConfig

ErrorFn = Callable[["list[torch.Tensor]"], "torch.Tensor"]


def fake_quant(w: torch.Tensor, grid: IntGridConfig,
               scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Round-to-nearest onto ``grid`` and back (float32), as the written file would hold."""
    scale_dtype = scale_dtype or torch.float16
    return fake_quantize(w, grid, scale_dtype)


def fake_quant_groups(wg: torch.Tensor, grid: IntGridConfig,
                      scale_dtype: torch.dtype | None = None,
                      minmax: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`fake_quant` on a grouped view ``[..., g]`` (one group per last-dim row, zero
    padded), value for value: a new float32 tensor, ``wg`` untouched. ``minmax`` are the
    groups' min and max when the caller knows them (the clip search does, analytically).

    Four full-size passes (divide, round, clamp, multiply) plus one for min/max, against ten
    for the general path: zeros in padding change neither a zero-point range nor an absmax,
    and ``clamp(round(w/s) + z, 0, qmax) − z`` is ``clamp(round(w/s), −z, qmax − z)`` exactly
    for the small integers involved."""
    scale_dtype = scale_dtype or torch.float16
    mn, mx = minmax if minmax is not None else torch.aminmax(wg, dim=-1)
    if grid.symmetric:
        scale = torch.maximum(mn.abs(), mx.abs()) / (grid.sym_zero - 0.5)
    else:
        mn = mn.clamp(max=0.0)
        scale = (mx.clamp(min=0.0) - mn) / grid.qmax
    # fit_scales: scales rounded to their storage dtype before the codes are chosen
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype)
    scale = torch.where(scale > 0, scale,
                        torch.full_like(scale, _smallest_positive(scale_dtype))).float()
    q = torch.div(wg, scale.unsqueeze(-1)).round_()
    if grid.symmetric:
        q.clamp_(-grid.sym_zero, grid.qmax - grid.sym_zero)
    else:
        z = torch.round(-mn / scale).clamp_(0, grid.qmax).unsqueeze(-1)
        q.clamp_(-z, grid.qmax - z)
    return q.mul_(scale.unsqueeze(-1))


def _fake_quant_rows(w: torch.Tensor, grid: IntGridConfig) -> torch.Tensor:
    """``fake_quant(w)`` for ``[rows, in]`` through the grouped fast path."""
    if grid.granularity == "tensor":
        return fake_quant(w, grid)
    q = fake_quant_groups(pad_groups(w, grid), grid)
    return q.reshape(w.shape[0], -1)[:, : w.shape[1]]


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


def scaled_trial(w: torch.Tensor, s: torch.Tensor | None, grid: IntGridConfig) -> torch.Tensor:
    """``Q(w·diag(s))·diag(s)⁻¹`` (plain ``Q(w)`` for ``s`` None): what the scaled weights
    compute after rounding, in float32."""
    if s is None:
        return _fake_quant_rows(w.float(), grid)
    return _fake_quant_rows(w.float() * s, grid).div_(s)


@dataclass
class ScaleSearch:
    scales: torch.Tensor          # [in]; all ones when plain rounding was best
    ratio: float | None           # the chosen α, None for the identity
    losses: dict[float | None, float]  # output MSE per evaluated α (None: plain rounding)


def output_error(inspect: Callable[[list[torch.Tensor]], torch.Tensor],
                 reference: torch.Tensor) -> ErrorFn:
    """The error function of a module's output: ``mean((inspect(trial) − reference)²)``."""
    ref = reference.float()
    return lambda trial: (inspect(trial).float() - ref).pow_(2).mean()


def expected_candidates(n_grid: int, exhaustive: bool = False) -> int:
    """How many α :func:`search_scales` evaluates: every lattice point and the identity when
    ``exhaustive``; else the identity, the coarse points every ``n/5``-th and, on average,
    half a coarse step of refinement plus the last failed neighbour (what the plan counts)."""
    if exhaustive:
        return n_grid + 1
    step = max(1, n_grid // 5)
    return 1 + -(-n_grid // step) + (step // 2 + 1 if step > 1 else 0)


def search_scales(x_mean: torch.Tensor, weights: Sequence[torch.Tensor], grid: IntGridConfig,
                  inspect: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
                  reference: torch.Tensor | None = None, n_grid: int = 20, duo: bool = True,
                  exhaustive: bool = False, error: ErrorFn | None = None) -> ScaleSearch:
    """Search α on the lattice {0, 1/n, …, (n−1)/n} (plus the identity, plain rounding).

    ``inspect(trial_weights)`` runs the module that consumes the linears' outputs with the
    given (fake-quantized, rescaled) weights and returns its output; ``reference`` is that
    output with the float weights. Instead of both, ``error(trial_weights)`` may return the
    loss directly (a scalar tensor).
    ``exhaustive`` evaluates every lattice point, as AWQ does; otherwise every ~n/5-th point
    is evaluated and the best one refined by walking to lattice neighbours while the loss falls
    — the same answer when the loss is unimodal in α, in about half the forward passes.
    Returns the scales with the smallest MSE."""
    if error is None:
        if inspect is None or reference is None:
            raise TypeError("search_scales needs inspect and reference, or error")
        error = output_error(inspect, reference)
    x_mean = x_mean.float()
    w_mean = weight_magnitude(weights, grid) if duo else None
    rows = [w.shape[0] for w in weights]
    w_all = torch.cat([w.float() for w in weights]) if len(weights) > 1 else weights[0].float()
    losses: dict[float | None, float] = {}

    def loss(i: int | None) -> float:
        ratio = None if i is None else i / n_grid
        if ratio not in losses:
            s = None if i is None else candidate_scales(x_mean, w_mean, ratio)
            trial = list(scaled_trial(w_all, s, grid).split(rows))
            losses[ratio] = float(error(trial))
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


def _clip_chunk(elems: int, n_cand: int, device: torch.device) -> int:
    """Clip candidates evaluated together: one on a CPU (cache-sized passes); on a GPU as
    many as keep the trial weights under 32 M elements (fewer, larger kernels)."""
    if device.type == "cpu":
        return 1
    return max(1, min(n_cand, (1 << 25) // max(1, elems)))


def search_clip(w: torch.Tensor, x: torch.Tensor, grid: IntGridConfig, n_grid: int = 20,
                max_shrink: float = 0.5, row_batch: int = 512) -> torch.Tensor:
    """Per (row, group) clip value ``[rows, n_groups]`` minimising the group's output error
    ``mean_t (x_t·Q(clamp(w))_g − x_t·w_g)²`` over the sampled inputs ``x`` ``[T, in]``; the
    first smallest of the shrink factors ``1, 1 − 1/n, …`` wins.

    The error is evaluated as the quadratic form ``dᵀ G_g d`` of the weight change ``d`` with
    each group's Gram matrix ``G_g = X_gᵀX_g / T`` (the same number as through the outputs,
    with ``g/T`` of the work: 8x less at AWQ's 512 tokens and group 64). The clamped groups'
    min/max (hence their scales) come from the float groups' min/max without a pass over the
    trials, and rounding takes the grouped fast path."""
    w = w.float()
    xg = pad_groups(x.reshape(-1, x.shape[-1]).float(), grid).transpose(0, 1)  # [n, T, g]
    gram = torch.bmm(xg.transpose(1, 2), xg).div_(xg.shape[1])                 # [n, g, g]
    n_cand = max(1, int(max_shrink * n_grid))
    # 1 − i/n rounded once to float32, as multiplying by the Python number does
    shrink = torch.tensor([1 - i / n_grid for i in range(n_cand)], device=w.device)
    out = torch.empty(w.shape[0], xg.shape[0], device=w.device)
    for r0 in range(0, w.shape[0], row_batch):
        wg = pad_groups(w[r0:r0 + row_batch], grid)                 # [r, n, g]
        rows, n, g = wg.shape
        mn, mx = torch.aminmax(wg, dim=2)                            # [r, n]
        org_max = torch.maximum(mn.abs(), mx.abs())
        chunk = _clip_chunk(wg.numel(), n_cand, w.device)
        best_err = best = None
        for c0 in range(0, n_cand, chunk):
            max_val = shrink[c0:c0 + chunk].view(-1, 1, 1) * org_max   # [c, r, n]
            lo = -max_val
            # min/max of a clamped group are its clamped min/max
            minmax = torch.clamp(mn, lo, max_val), torch.clamp(mx, lo, max_val)
            trial = torch.clamp(wg, lo.unsqueeze(-1), max_val.unsqueeze(-1))  # [c, r, n, g]
            d = fake_quant_groups(trial, grid, minmax=minmax).sub_(wg)
            c = d.shape[0]
            d = d.permute(2, 0, 1, 3).reshape(n, c * rows, g)          # [n, c·r, g]
            err = torch.bmm(d, gram).mul_(d).sum(dim=2).view(n, c, rows)   # [n, c, r]
            c_err, c_idx = err.min(dim=1)                              # [n, r]
            c_best = max_val.gather(0, c_idx.t().unsqueeze(0)).squeeze(0)    # [r, n]
            c_err = c_err.t()
            if best is None:
                best_err, best = c_err, c_best
            else:
                better = c_err < best_err
                best_err = torch.where(better, c_err, best_err)
                best = torch.where(better, c_best, best)
        out[r0:r0 + rows] = best
    return out


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, grid: IntGridConfig) -> torch.Tensor:
    idx = group_index(w.shape[1], grid, w.device).long()
    bound = max_val.to(w.device, w.dtype)[:, idx]
    return torch.maximum(torch.minimum(w, bound), -bound)


def fold_norm(w: torch.Tensor, s: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """The norm weight whose scale ``offset + w'`` is ``(offset + w) / s`` (Gemma's norms scale
    by ``1 + w``: ``ArchSpec.norm_offset``)."""
    return (w + offset) / s - offset if offset else w / s


def fold_scales(prev: torch.nn.Module, linears: Sequence[torch.nn.Module],
                scales: torch.Tensor, offset: float = 0.0, rows: slice | None = None) -> None:
    """``prev`` output ÷ s, consumers' input columns × s: the float function is unchanged.

    ``prev`` is a norm (its weight vector is divided; a norm scaling by ``offset + w`` gets
    ``(offset + w) / s - offset``) or a linear (its output rows and bias; only ``rows`` of
    them where the producing linear is a part of a fused one)."""
    s = scales.to(prev.weight.device, prev.weight.dtype)
    rows = slice(None) if rows is None else rows
    if prev.weight.dim() == 1:
        prev.weight.data.copy_(fold_norm(prev.weight.data, s, offset))
    else:
        prev.weight.data[rows].div_(s.view(-1, 1))
    if getattr(prev, "bias", None) is not None:
        prev.bias.data[rows].div_(s)
    for lin in linears:
        lin.weight.data.mul_(s.view(1, -1))
