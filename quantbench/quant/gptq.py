"""GPTQ as pure tensor functions: column-wise error feedback with lazy batch updates.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (2022). Works on any integer grid of ``quantbench.quant.grid``: group parameters
are fitted on the (error-updated) weights when a group starts, then each column is rounded with
them and its error is spread over the columns not yet quantized, weighted by the inverse
Hessian. Runs where its inputs are (CPU or CUDA), in float32.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from quantbench.lazy import torch
from quantbench.quant.grid import fit_scales, search_scales
from quantbench.tensor import QuantizedTensor
from quantbench.threads import run_chunks, single_threaded

if TYPE_CHECKING:
    from quantbench.quant.grids.int import IntGridConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQParams:
    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = False
    scale_search: bool = True  # group ranges shrunk where that lowers diag(H)-weighted error


@dataclass
class GPTQStats:
    damp: float
    damp_increased: bool
    proxy_error: float  # Σ (w − q)² / d² as GPTQ reports it


def inverse_hessian_cholesky(hessian: torch.Tensor, damp_percent: float,
                             max_tries: int = 6) -> tuple[torch.Tensor, float, bool]:
    """Upper Cholesky factor of ``(H + λI)⁻¹``; λ starts at ``damp_percent·mean(diag H)`` and
    grows ×10 until the factorisation succeeds."""
    return _reversed_factor(hessian.flip(0, 1), damp_percent, max_tries)


def _reversed_factor(reversed_h: torch.Tensor, damp_percent: float, max_tries: int = 6
                     ) -> tuple[torch.Tensor, float, bool]:
    """:func:`inverse_hessian_cholesky` given ``J·H·J`` (``J`` the order reversal), which it
    may overwrite. With ``J·H·J = L·Lᵀ``, ``H = R·Rᵀ`` for the upper triangular ``R = J·L·J``,
    so ``H⁻¹ = (R⁻¹)ᵀ·R⁻¹`` and the factor wanted is ``R⁻¹ = J·L⁻¹·J``: one Cholesky and one
    triangular inverse, without forming ``H⁻¹`` (about 2x faster than inverting and
    factorising again, as accurate)."""
    lower, damp, increased = damped_cholesky(reversed_h, damp_percent, max_tries)
    eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    upper = torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
    return upper, damp, increased


def damped_cholesky(hessian: torch.Tensor, damp_percent: float, max_tries: int = 6
                    ) -> tuple[torch.Tensor, float, bool]:
    """Lower Cholesky factor of ``H + λI`` (``H`` overwritten), λ starting at
    ``damp_percent·mean(diag H)`` and growing ×10 until the factorisation succeeds; returns
    ``(L, λ, whether λ grew)``."""
    diag = hessian.diagonal()
    mean_diag = float(diag.mean())
    damp = damp_percent * mean_diag if mean_diag > 0 else 1e-6
    diag += damp
    for attempt in range(max_tries):
        lower, info = torch.linalg.cholesky_ex(hessian)
        if int(info) == 0:
            return lower, damp, attempt > 0
        diag += 9.0 * damp  # λ → 10·λ
        damp *= 10.0
    raise torch.linalg.LinAlgError(f"Hessian not positive definite even with damping {damp:g}")


def float_target_weight(weight: torch.Tensor, cross: torch.Tensor, hessian: torch.Tensor,
                        damp_percent: float) -> torch.Tensor:
    """The weight GPTQ should round when its targets come from the float model (GPTAQ's
    asymmetric calibration): with ``X_q`` the inputs the quantized model feeds the linear and
    ``X_f`` the float model's, ``‖W·X_f − Q·X_q‖² = ‖(W̃ − Q)·X_q‖² + const`` for the
    least-squares ``W̃ = W·C·H⁻¹`` (``C = 2·X_fᵀX_q/n``, ``H = 2·X_qᵀX_q/n``), so GPTQ on ``W̃``
    with ``H`` minimises the error against the float model's outputs, earlier layers'
    quantization error included. Computed as ``W + W·(C − H)·(H + λI)⁻¹``: only the correction
    is damped (GPTQ's λ), so equal inputs give ``W`` itself. Returns float32 ``[out, in]``;
    columns no input reaches stay 0 as GPTQ leaves them."""
    H = hessian.float().clone()
    delta = cross.float() - H                        # C − H
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    lower, _, _ = damped_cholesky(H, damp_percent)
    W = weight.float()
    change = torch.cholesky_solve((W @ delta).T.contiguous(), lower).T  # W·(C−H)·H⁻¹
    out = W + change
    out[:, dead] = 0.0
    return out.contiguous()


Upcoming = Callable[[int], "torch.Tensor"]
RoundColumn = Callable[["torch.Tensor", int, Upcoming], "tuple[torch.Tensor, torch.Tensor]"]


def column_sweep(W: torch.Tensor, Hinv: torch.Tensor, block_size: int,
                 round_col: RoundColumn) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column sweep over ``W [out, in]`` (columns already in processing order; used as
    scratch) with the upper Cholesky factor ``Hinv`` of ``H⁻¹``, in lazy batches of
    ``block_size`` columns.

    ``round_col(w, j, upcoming)`` rounds column ``j`` (its error-updated values ``w [out]``)
    and returns ``(dequantized [out], codes [out])``; ``upcoming()`` gives the error-updated
    columns ``j..j + width`` as ``[out, width]`` (fewer at the end; for grids fitted as a group
    starts: only the group is copied, not every column still to come). Returns
    ``(codes [out, in]`` float in processing order, ``losses [out]`` = Σ (w − q)² / d² / 2 per
    row).

    The sweep works on ``Wᵀ``: a column is then one contiguous row, and the rank-1 error
    update of the columns still to come is one contiguous block (about 2x faster per column
    than updating a strided slice; the column steps are latency-bound)."""
    out_f, in_f = W.shape
    WT = W.T.contiguous()                                    # [in, out]
    codesT = torch.empty(in_f, out_f, device=W.device)
    losses = torch.zeros(out_f, device=W.device)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = WT[i1:i2].clone()
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        inv_d = (1.0 / torch.diagonal(Hinv1)).tolist()
        # the column steps are many small ops: intra-op threads only add synchronisation
        # (4-7x slower with 2 threads on a busy 2-core machine); the batch update below is
        # one large product and keeps them
        with single_threaded(W.device):
            for i in range(i2 - i1):
                def upcoming(width: int, i: int = i, W1: torch.Tensor = W1, i2: int = i2
                             ) -> torch.Tensor:
                    inside = W1.shape[0] - i
                    if width <= inside:
                        return W1[i:i + width].T.contiguous()
                    return torch.cat([W1[i:], WT[i2:i2 + width - inside]]).T.contiguous()

                w = W1[i]
                deq, q = round_col(w, i1 + i, upcoming)
                err = torch.sub(w, deq, out=Err1[i]).mul_(inv_d[i])
                codesT[i1 + i] = q
                W1[i + 1:].addr_(Hinv1[i, i + 1:], err, alpha=-1.0)
        losses += (Err1 * Err1 / 2).sum(dim=0)  # (w - q)² / d² / 2, as GPTQ reports it
        WT[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1.0)  # in place: no temporary
    return codesT.T, losses


def _column_grid(grid: IntGridConfig) -> IntGridConfig:
    granularity = "tensor" if grid.granularity == "tensor" else "channel"
    return dataclasses.replace(grid, granularity=granularity, group_size=0)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, grid: IntGridConfig,
                  params: GPTQParams = GPTQParams(),
                  scale_dtype: torch.dtype | None = None,
                  order: torch.Tensor | None = None) -> tuple[QuantizedTensor, GPTQStats]:
    """Quantize ``weight [out, in]`` given the input Hessian ``H = 2·XᵀX/n [in, in]``.

    ``order``: the act-order to use instead of ``H``'s own (row blocks swept on different
    Hessians that must share one column order, e.g. one ``g_idx`` for the whole tensor)."""
    scale_dtype = scale_dtype or torch.float16
    qt, losses, damp, increased = _gptq_rows(weight, hessian, grid, params, scale_dtype, order)
    return qt, GPTQStats(damp=damp, damp_increased=increased, proxy_error=float(losses.sum()))


def gptq_quantize_many(weights: list[torch.Tensor], hessian: torch.Tensor, grid: IntGridConfig,
                       params: GPTQParams = GPTQParams(),
                       scale_dtype: torch.dtype | None = None
                       ) -> list[tuple[QuantizedTensor, GPTQStats]]:
    """:func:`gptq_quantize` of several weights that share one input (q/k/v, gate/up) in one
    sweep. GPTQ's error feedback runs along a row and never across rows, and every row here
    sees the same Hessian (one factorisation, one act-order), so the weights are stacked
    row-wise, swept once and split: the same codes as separate calls up to float summation
    order, in one column loop instead of one per weight. Per-tensor grids are not stacked (their
    one scale would be shared)."""
    scale_dtype = scale_dtype or torch.float16
    if grid.granularity == "tensor" or len(weights) < 2:
        return [gptq_quantize(w, hessian, grid, params, scale_dtype) for w in weights]
    if len({int(w.shape[1]) for w in weights}) != 1:
        raise ValueError("weights sharing an input must have the same in_features")
    stacked = torch.cat([w.float() for w in weights])
    qt, losses, damp, increased = _gptq_rows(stacked, hessian, grid, params, scale_dtype)
    out, row = [], 0
    for w in weights:
        rows = slice(row, row + int(w.shape[0]))
        row = rows.stop
        part = QuantizedTensor(codes=qt.codes[rows].clone(), scales=qt.scales[rows].clone(),
                               zeros=None if qt.zeros is None else qt.zeros[rows].clone(),
                               grid=grid, dtype=w.dtype, g_idx=qt.g_idx, perm=qt.perm)
        out.append((part, GPTQStats(damp=damp, damp_increased=increased,
                                    proxy_error=float(losses[rows].sum()))))
    return out


def _gptq_rows(weight: torch.Tensor, hessian: torch.Tensor, grid: IntGridConfig,
               params: GPTQParams, scale_dtype: torch.dtype,
               order: torch.Tensor | None = None
               ) -> tuple[QuantizedTensor, torch.Tensor, float, bool]:
    """:func:`gptq_quantize` returning the per-row losses, damping and whether it grew; a
    weight of up to :data:`SINGLE_THREAD_ELEMENTS` is solved on one CPU thread (its products
    are too small for intra-op threads to pay for their synchronisation)."""
    inverse = shared_inverse(hessian, params, order)
    parts = row_parts(weight) if grid.granularity != "tensor" else [slice(None)]
    if len(parts) == 1:
        if weight.numel() <= SINGLE_THREAD_ELEMENTS:
            with single_threaded(weight.device):
                return _gptq_rows_impl(weight, hessian, grid, params, scale_dtype, inverse,
                                       order)
        return _gptq_rows_impl(weight, hessian, grid, params, scale_dtype, inverse, order)
    done: dict[int, tuple[QuantizedTensor, torch.Tensor, float, bool]] = {}

    def one(i: int) -> None:
        done[i] = _gptq_rows_impl(weight[parts[i]], hessian, grid, params, scale_dtype, inverse,
                                  order)

    run_chunks(one, range(len(parts)))
    pieces = [done[i] for i in range(len(parts))]
    qt = stack_rows([p[0] for p in pieces])
    return qt, torch.cat([p[1] for p in pieces]), pieces[0][2], pieces[0][3]


def stack_rows(pieces: list[QuantizedTensor]) -> QuantizedTensor:
    """Row blocks of one weight, quantized on one grid with one column order, as one tensor
    (``g_idx``/``perm`` are the blocks' shared ones)."""
    first = pieces[0]
    return QuantizedTensor(
        codes=torch.cat([p.codes for p in pieces]),
        scales=torch.cat([p.scales for p in pieces]),
        zeros=None if first.zeros is None else torch.cat([p.zeros for p in pieces]),
        grid=first.grid, dtype=first.dtype, g_idx=first.g_idx, perm=first.perm)


SINGLE_THREAD_ELEMENTS = 1 << 22
PART_MIN_ELEMENTS = 1 << 19   # rows worth a worker thread of their own


def row_parts(weight: torch.Tensor) -> list[slice]:
    """Row ranges swept side by side on the CPU's worker threads (GPTQ never moves error
    across rows, and every row shares the Hessian's factorisation): one per thread while each
    keeps at least :data:`PART_MIN_ELEMENTS` weights; one range on a GPU."""
    if weight.device.type != "cpu":
        return [slice(None)]
    rows = int(weight.shape[0])
    n = min(torch.get_num_threads(), max(1, weight.numel() // PART_MIN_ELEMENTS), rows)
    if n <= 1:
        return [slice(None)]
    bounds = [rows * i // n for i in range(n + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def act_order(hessian: torch.Tensor, params: GPTQParams,
              order: torch.Tensor | None = None) -> torch.Tensor | None:
    """The processing order of the columns: ``order`` when given, else by descending ``diag H``
    (dead columns counted as 1); None without act-order."""
    if not params.act_order:
        return None
    if order is not None:
        return order.to(hessian.device)
    diag = torch.diag(hessian).float().clone()
    diag[diag == 0] = 1.0
    return torch.argsort(diag, descending=True)


def shared_inverse(hessian: torch.Tensor, params: GPTQParams,
                   order: torch.Tensor | None = None) -> tuple[torch.Tensor, float, bool]:
    """The factorisation every row shares, computed once per weight (or stack): dead columns
    patched, act-order (:func:`act_order`) applied, then :func:`inverse_hessian_cholesky`."""
    diag = torch.diag(hessian).float()
    dead = diag == 0
    perm = act_order(hessian, params, order)
    order = perm if perm is not None else torch.arange(diag.numel(), device=diag.device)
    rev = order.flip(0)
    H = hessian.float()[rev[:, None], rev]  # J·H·J in processing order: one gather, a copy
    H.diagonal()[dead[rev]] = 1.0
    return _reversed_factor(H, params.damp_percent)


def _gptq_rows_impl(weight: torch.Tensor, hessian: torch.Tensor, grid: IntGridConfig,
                    params: GPTQParams, scale_dtype: torch.dtype,
                    inverse: tuple[torch.Tensor, float, bool],
                    given_order: torch.Tensor | None = None
                    ) -> tuple[QuantizedTensor, torch.Tensor, float, bool]:
    W = weight.float().clone()
    out_f, in_f = W.shape
    diag = torch.diag(hessian).float().clone()   # the factorisation itself is ``inverse``
    dead = diag == 0
    diag[dead] = 1.0
    W[:, dead] = 0.0
    col = _column_grid(grid)
    g = grid.group_size if grid.granularity == "group" else in_f

    def fit(w: torch.Tensor, grid_: IntGridConfig, importance: torch.Tensor):
        if params.scale_search:
            return search_scales(w, grid_, scale_dtype, importance)
        return fit_scales(w, grid_, scale_dtype)

    static = fit(W, grid, diag) if (  # groups fixed on the original weights
        params.static_groups and grid.granularity == "group") else None
    whole = None if grid.granularity == "group" else fit(W, col, diag)
    perm = act_order(hessian, params, given_order)
    if perm is not None:
        W = W[:, perm]
    diag_proc = diag[perm] if perm is not None else diag  # in processing order
    Hinv, damp, increased = inverse
    dev = W.device
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=dev)
    n_groups = grid.n_groups(in_f)
    scales = torch.zeros(out_f if grid.granularity != "tensor" else 1, n_groups,
                         dtype=scale_dtype, device=dev)
    zeros = None if grid.symmetric else torch.zeros_like(scales, dtype=torch.int32)
    qmax = float(grid.qmax)
    order = perm if perm is not None else torch.arange(in_f, device=dev)

    def column_params(params_: tuple[torch.Tensor, torch.Tensor | None]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        s_ = params_[0].float()[:, 0]
        z_ = params_[1].float()[:, 0] if params_[1] is not None else \
            torch.full_like(s_, float(grid.sym_zero))
        return s_, z_

    if static is not None:  # every column's (scale, zero) known up front, in processing order
        col_group = (order // g).long()
        s_all = static[0].float()[:, col_group]
        z_all = static[1].float()[:, col_group] if static[1] is not None else \
            torch.full_like(s_all, float(grid.sym_zero))
    s_col, z_col = column_params(whole) if whole is not None else (None, None)
    state: dict[str, torch.Tensor] = {}

    def round_col(w: torch.Tensor, j: int, upcoming: Upcoming) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
        if static is not None:
            s_, z_ = s_all[:, j], z_all[:, j]
        elif grid.granularity == "group":
            if j % g == 0:
                current = fit(upcoming(g), col, diag_proc[j:j + g])
                scales[:, j // g] = current[0][:, 0]
                if zeros is not None:
                    zeros[:, j // g] = current[1][:, 0]
                state["s"], state["z"] = column_params(current)
            s_, z_ = state["s"], state["z"]
        else:
            s_, z_ = s_col, z_col
        q = torch.clamp(torch.round(w / s_) + z_, 0.0, qmax)
        return (q - z_) * s_, q

    q_proc, losses = column_sweep(W, Hinv, params.block_size, round_col)
    codes[:, order] = q_proc.to(torch.uint8)
    g_idx = None
    if static is not None:
        scales, zeros = static[0], static[1]
    elif whole is not None:
        scales, zeros = whole
    elif perm is not None:
        g_idx = torch.empty(in_f, dtype=torch.int32, device=dev)
        g_idx[perm] = (torch.arange(in_f, device=dev) // g).to(torch.int32)
    qt = QuantizedTensor(codes=codes, scales=scales, zeros=zeros, grid=grid, dtype=weight.dtype,
                         g_idx=g_idx, perm=perm.to(torch.int32) if perm is not None else None)
    return qt, losses, damp, increased
