"""Pure tensor functions for the integer grid: fit scales/zeros, round, dequantize.

Weights are ``[out, in]`` float tensors; scales and zeros are ``[out or 1, n_groups]``.
Scales are rounded to their storage dtype *before* codes are chosen, so the codes are the best
ones for the scale that is actually written to disk.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from quantbench.lazy import torch

if TYPE_CHECKING:
    from quantbench.quant.grids.int import IntGridConfig


def _smallest_positive(dtype: torch.dtype) -> float:
    if dtype == torch.float16:
        return 2.0**-24
    if dtype == torch.bfloat16:
        return 2.0**-133
    return torch.finfo(torch.float32).tiny


def group_index(in_features: int, grid: IntGridConfig, device=None) -> torch.Tensor:
    """Group of each input column in original order (``c // group_size``)."""
    cols = torch.arange(in_features, device=device)
    if grid.granularity == "group":
        return (cols // grid.group_size).to(torch.int32)
    return torch.zeros(in_features, dtype=torch.int32, device=device)


def _grouped_minmax(w: torch.Tensor, grid: IntGridConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max of ``w`` as ``[rows, n_groups]``; a short last group is allowed."""
    if grid.granularity == "tensor":
        return w.min().reshape(1, 1), w.max().reshape(1, 1)
    if grid.granularity == "channel":
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    out_f, in_f = w.shape
    g = grid.group_size
    n = grid.n_groups(in_f)
    pad = n * g - in_f
    if pad:
        # Pad the short last group with copies of its own first column: min/max unchanged.
        w = torch.cat([w, w[:, (n - 1) * g : (n - 1) * g + 1].expand(out_f, pad)], dim=1)
    blocks = w.reshape(out_f, n, g)
    return blocks.amin(dim=2), blocks.amax(dim=2)


def fit_scales(
    w: torch.Tensor, grid: IntGridConfig, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest parameters: (scales in ``scale_dtype``, int32 zeros or None)."""
    scale_dtype = scale_dtype or torch.float16
    wmin, wmax = _grouped_minmax(w.float(), grid)
    return _params_for_range(wmin, wmax, grid, scale_dtype)


def search_scales(w: torch.Tensor, grid: IntGridConfig, scale_dtype: torch.dtype | None = None,
                  importance: torch.Tensor | None = None, steps: int = 20,
                  max_shrink: float = 0.2) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fit_scales`` with each group's range shrunk by the factor ``1 − max_shrink·k/steps``
    (k = 0..steps) that minimises its importance-weighted squared rounding error
    ``Σ importance[c]·(w − q)²`` (``importance`` per input column, e.g. GPTQ's diag(H); uniform
    when None). k = 0 is plain min/max, so the result is never worse than ``fit_scales`` on
    this measure. Per-tensor grids are returned unsearched."""
    scale_dtype = scale_dtype or torch.float16
    if grid.granularity == "tensor" or steps < 1:
        return fit_scales(w, grid, scale_dtype)
    w = w.float()
    wg = pad_groups(w, grid)                                   # [rows, n, g]
    rows, n, g = wg.shape
    imp = torch.ones(w.shape[1], device=w.device) if importance is None else \
        importance.float().clamp(min=0)
    imp = torch.cat([imp, imp.new_zeros(n * g - w.shape[1])]).reshape(1, n, g)
    chunk = rows if w.device.type != "cpu" else max(1, SEARCH_CHUNK_ELEMENTS // (n * g))
    if chunk < rows:  # rows are independent: search cache-sized row ranges one at a time
        found = [_search_groups(wg[r:r + chunk], imp, grid, scale_dtype, steps, max_shrink)
                 for r in range(0, rows, chunk)]
        return (torch.cat([f[0] for f in found]),
                None if found[0][1] is None else torch.cat([f[1] for f in found]))
    return _search_groups(wg, imp, grid, scale_dtype, steps, max_shrink)


# CPU row ranges of the scale search: its 2·steps passes then stay in cache, and its
# temporaries stay below the pinned mmap threshold (no fresh pages to fault in per pass)
SEARCH_CHUNK_ELEMENTS = 1 << 16


def _search_groups(wg: torch.Tensor, imp: torch.Tensor, grid: IntGridConfig,
                   scale_dtype: torch.dtype, steps: int, max_shrink: float
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`search_scales` on grouped weights ``wg [rows, n, g]`` with ``imp [1, n, g]``."""
    wmin, wmax = wg.amin(dim=2), wg.amax(dim=2)
    best_err = best_scale = best_zero = None
    for k in range(steps + 1):
        p = 1.0 - max_shrink * k / steps
        scale, zeros = _params_for_range(wmin * p, wmax * p, grid, scale_dtype)
        s = scale.float().unsqueeze(-1)
        z = zeros.float().unsqueeze(-1) if zeros is not None else float(grid.sym_zero)
        q = torch.round(wg / s).add_(z).clamp_(0, grid.qmax)
        err = (q.sub_(z).mul_(s).sub_(wg).square_().mul_(imp)).sum(dim=2)   # [rows, n]
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zeros
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zeros is not None:
            best_zero = torch.where(better, zeros, best_zero)
    return best_scale, best_zero


def _params_for_range(wmin: torch.Tensor, wmax: torch.Tensor, grid: IntGridConfig,
                      scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero codes) that map ``[wmin, wmax]`` onto the grid, as ``fit_scales``."""
    if grid.symmetric:
        scale = torch.maximum(wmin.abs(), wmax.abs()) / (grid.sym_zero - 0.5)
    else:
        wmin, wmax = wmin.clamp(max=0.0), wmax.clamp(min=0.0)
        scale = (wmax - wmin) / grid.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype)
    scale = torch.where(
        scale > 0, scale, torch.full_like(scale, _smallest_positive(scale_dtype))
    )
    zeros = None if grid.symmetric else \
        torch.round(-wmin / scale.float()).clamp(0, grid.qmax).to(torch.int32)
    return scale, zeros


def expand_groups(params: torch.Tensor, g_idx: torch.Tensor, grid: IntGridConfig) -> torch.Tensor:
    """``[rows, n_groups]`` → ``[rows, in]`` by each column's group (broadcast for per-tensor)."""
    if params.shape[1] == 1:
        return params
    return params[:, g_idx.long()]


def zero_points(zeros: torch.Tensor | None, grid: IntGridConfig, like: torch.Tensor) -> torch.Tensor:
    if zeros is None:
        return torch.full((1, 1), float(grid.sym_zero), device=like.device)
    return zeros.float()


def _per_column(like: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                grid: IntGridConfig, g_idx: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points expanded to ``[rows, in]`` (or broadcastable) by column group."""
    if g_idx is None:
        g_idx = group_index(like.shape[1], grid, like.device)
    return (expand_groups(scales.float(), g_idx, grid),
            expand_groups(zero_points(zeros, grid, like), g_idx, grid))


def quantize_codes(
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    grid: IntGridConfig,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Nearest codes (uint8, ``[out, in]``) for fixed scales and zeros."""
    w = w.float()
    s, z = _per_column(w, scales, zeros, grid, g_idx)
    q = torch.round(w / s) + z
    return q.clamp_(0, grid.qmax).to(torch.uint8)


def dequantize_codes(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    grid: IntGridConfig,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scale * (code - zero)`` in float32, ``[out, in]``."""
    rows, cols = codes.shape
    if _in_order(g_idx, cols, grid) and scales.shape[1] == cols // grid.group_size > 1:
        # whole groups in column order: broadcast each group's scale and zero over its columns
        # (the same products as the gathered per-column ones, without the [out, in] copies)
        g = grid.group_size
        z = zero_points(zeros, grid, codes)
        z = z.reshape(rows, -1, 1) if z.numel() > 1 else z
        out = (codes.float().reshape(rows, -1, g) - z) * scales.float().reshape(rows, -1, 1)
        return out.reshape(rows, cols)
    s, z = _per_column(codes, scales, zeros, grid, g_idx)
    return (codes.float() - z) * s


def _in_order(g_idx: torch.Tensor | None, cols: int, grid: IntGridConfig) -> bool:
    """Whether column ``c`` is in group ``c // group_size`` for every column (no act-order
    permutation) and the groups are whole."""
    if grid.granularity != "group" or cols % grid.group_size:
        return False
    return g_idx is None or torch.equal(g_idx.to(torch.int32),
                                        group_index(cols, grid, g_idx.device))


def pad_groups(w: torch.Tensor, grid: IntGridConfig) -> torch.Tensor:
    """``[rows, in]`` → ``[rows, n_groups, g]`` (one group per row for channel granularity);
    a short last group is padded with zeros, which changes neither a zero-point range (it
    always contains 0) nor an absmax."""
    rows, in_f = w.shape
    g = grid.group_size if grid.granularity == "group" else in_f
    n = -(-in_f // g)
    if n * g != in_f:
        w = torch.cat([w, w.new_zeros(rows, n * g - in_f)], dim=1)
    return w.reshape(rows, n, g)


def fake_quantize(w: torch.Tensor, grid: IntGridConfig,
                  scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``dequantize(quantize(w))`` for round-to-nearest with fitted scales, in float32 —
    identical to ``fit_scales`` + ``quantize_codes`` + ``dequantize_codes`` but computed on
    the grouped view (no per-column gathers): the inner loop of AWQ's searches."""
    scale_dtype = scale_dtype or torch.float16
    w = w.float()
    if grid.granularity == "tensor":
        scales, zeros = fit_scales(w, grid, scale_dtype)
        return dequantize_codes(quantize_codes(w, scales, zeros, grid), scales, zeros, grid)
    scales, zeros = fit_scales(w, grid, scale_dtype)
    wg = pad_groups(w, grid)
    s = scales.float().unsqueeze(-1)
    z = zeros.float().unsqueeze(-1) if zeros is not None else float(grid.sym_zero)
    q = torch.round(wg / s).add_(z).clamp_(0, grid.qmax)
    return q.sub_(z).mul_(s).reshape(w.shape[0], -1)[:, : w.shape[1]]
