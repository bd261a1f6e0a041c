"""Scale searches shared by the GGUF codecs: llama.cpp's ``make_*_quants`` helpers as tensors.

Each helper mirrors one static function of ``ggml-quants.c`` for a batch of groups at once:
``x`` is ``[B, n]`` float32 (one group of ``n`` values per row) and everything the C code keeps
per group becomes a ``[B]`` tensor. The float32 arithmetic is the C code's, operation by
operation (no FMA, no reassociation): sums over a group are accumulated element by element in
the C order (:func:`seq_sum`), constants such as ``0.1f`` are float32 before use, and
``nearest_int`` is the ``12582912`` bit trick. Where the candidates of a search do not
depend on each other they are evaluated side by side (an extra ``[B, K]`` axis) and then
accepted one after the other, in the C loop's order, so the result is what the sequential
loop would pick; where they do (``make_qkx*``), the candidate loop runs in order.

``L`` (the integer levels) comes back as int64 ``[B, n]``.
"""
from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = float(np.float32(1e-15))


def f32(value: float) -> float:
    """``value`` rounded to float32 (a C ``float`` literal such as ``0.1f``)."""
    return float(np.float32(value))


def nearest_int(fval: torch.Tensor) -> torch.Tensor:
    """``nearest_int``: round half to even through ``fval + 12582912.f``, as int64."""
    val = (fval.float() + 12582912.0).view(torch.int32)
    return ((val & 0x007FFFFF) - 0x00400000).long()


def seq_sum(t: torch.Tensor, from_first: bool = False) -> torch.Tensor:
    """Sum over the last dim in C order: ``s = 0; for i: s += t[i]`` (``from_first``: start
    from ``t[0]`` instead of ``0``, as ``float s = t[0]; for i >= 1``)."""
    acc = t[..., 0].clone() if from_first else torch.zeros_like(t[..., 0])
    for i in range(1 if from_first else 0, t.shape[-1]):
        acc = acc + t[..., i]
    return acc


def first_abs_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The C loop ``amax = 0; max = 0; if (amax < fabsf(v)) { amax = fabsf(v); max = v; }``:
    ``(amax, max)`` with ``max`` the first element of largest magnitude (``+0`` if none)."""
    ax = x.abs()
    amax, idx = ax.max(dim=-1)
    mx = x.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    return amax, torch.where(amax > 0, mx, torch.zeros_like(mx))


def first_min(x: torch.Tensor) -> torch.Tensor:
    """``min = x[0]; if (x[i] < min) min = x[i]``: the first minimal element (sign of zero
    kept)."""
    idx = (x == x.amin(dim=-1, keepdim=True)).int().argmax(dim=-1, keepdim=True)
    return x.gather(-1, idx).squeeze(-1)


def first_max(x: torch.Tensor) -> torch.Tensor:
    """``max = x[0]; if (x[i] > max) max = x[i]``: the first maximal element."""
    idx = (x == x.amax(dim=-1, keepdim=True)).int().argmax(dim=-1, keepdim=True)
    return x.gather(-1, idx).squeeze(-1)


def sqrtf(t: torch.Tensor) -> torch.Tensor:
    """C ``sqrtf``, correctly rounded: torch's float32 ``sqrt`` on CPU is not (it can be one
    ulp off), so take it in float64 and round once to float32 (exact for sqrt)."""
    return t.double().sqrt().float()


def _recip(t: torch.Tensor) -> torch.Tensor:
    """``1/t`` as one correctly rounded float32 division."""
    return torch.div(torch.ones_like(t), t)


def rdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """``c/t`` as one correctly rounded float32 division (``c`` a float32 value). Python's
    ``c / tensor`` is ``tensor.reciprocal() * c`` in torch: two roundings, off by an ulp."""
    return torch.div(torch.full_like(t, c), t)


def _qx_weights(x: torch.Tensor, rmse_type: int, qw: torch.Tensor | None) -> torch.Tensor:
    if qw is not None:
        return qw.float()
    if rmse_type == 1:
        return x * x
    if rmse_type == 2:
        return torch.ones_like(x)
    if rmse_type == 3:
        return x.abs()
    return sqrtf(x.abs())


def make_qx_quants(x: torch.Tensor, nmax: int, rmse_type: int,
                   qw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type, qw)``: symmetric levels ``L`` in
    ``[0, 2·nmax)`` and the scale; ``rmse_type`` 0 (plain), ±1..4 (weights ``x²``, 1, ``|x|``,
    ``√|x|`` unless ``qw``), negative for the early return after the first pass."""
    x = x.float()
    amax, mx = first_abs_max(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    iscale0 = rdiv(-nmax, mx)
    if rmse_type == 0:
        l0 = nearest_int(iscale0[:, None] * x).clamp(-nmax, nmax - 1)
        scale, levels = _recip(iscale0), l0 + nmax
        return _zero_groups(scale, levels, zero)
    steps = [] if rmse_type < 0 else [i for i in range(-9, 10) if i != 0]
    consts = torch.tensor([-(np.float32(nmax) + np.float32(0.1) * np.float32(i)) for i in steps],
                          dtype=torch.float32).reshape(1, -1)
    iscales = torch.cat([iscale0[:, None], consts / mx[:, None]], dim=1)    # [B, K]
    lv = nearest_int(iscales[:, :, None] * x[:, None, :]).clamp(-nmax, nmax - 1)
    w = _qx_weights(x, abs(rmse_type), qw)
    lf = lv.float()
    sumlx = seq_sum((w * x)[:, None, :] * lf)
    suml2 = seq_sum((w[:, None, :] * lf) * lf)
    s0, l2 = sumlx[:, 0], suml2[:, 0]
    scale = torch.where(l2 != 0, s0 / torch.where(l2 != 0, l2, 1.0), torch.zeros_like(s0))
    levels = lv[:, 0]
    if rmse_type < 0:
        early = torch.where(l2 > 0, 0.5 * (scale + _recip(iscale0)), _recip(iscale0))
        return _zero_groups(early, levels + nmax, zero)
    best = scale * s0
    for k in range(1, iscales.shape[1]):
        sx, s2 = sumlx[:, k], suml2[:, k]
        take = (s2 > 0) & (sx * sx > best * s2)
        scale = torch.where(take, sx / torch.where(take, s2, 1.0), scale)
        best = torch.where(take, scale * sx, best)
        levels = torch.where(take[:, None], lv[:, k], levels)
    return _zero_groups(scale, levels + nmax, zero)


def _zero_groups(scale: torch.Tensor, levels: torch.Tensor, zero: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``amax < GROUP_MAX_EPS`` early return: ``L = 0``, scale ``0``."""
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, torch.where(zero[:, None], torch.zeros_like(levels), levels)


def make_qkx3_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor | None, rmin: float,
                     rdelta: float, nstep: int, use_mad: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx3_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep,
    use_mad)``: asymmetric levels ``L`` in ``[0, nmax]``; returns ``(scale, L, the_min)`` with
    ``x ≈ scale·L − the_min``. ``weights=None`` weighs by ``x²``."""
    return _make_qkx(x, nmax, weights, rmin, rdelta, nstep, use_mad)


def make_qkx2_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor, rmin: float,
                     rdelta: float, nstep: int, use_mad: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants``: the same search as :func:`make_qkx3_quants` with explicit
    weights (its ``max == min`` test equals qkx3's ``max <= min`` once ``min <= 0``)."""
    return _make_qkx(x, nmax, weights, rmin, rdelta, nstep, use_mad)


def _make_qkx(x: torch.Tensor, nmax: int, weights: torch.Tensor | None, rmin: float,
              rdelta: float, nstep: int, use_mad: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.float()
    w = x * x if weights is None else weights.float()
    mn, mx = first_min(x), first_max(x)
    sum_w = seq_sum(w, from_first=True)
    sum_x = seq_sum(w * x, from_first=True)
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx <= mn
    span = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale0 = rdiv(nmax, span)
    scale = _recip(iscale0)
    xm = x - mn[:, None]
    levels = nearest_int(iscale0[:, None] * xm).clamp(0, nmax)
    best = _error(scale[:, None], levels, mn[:, None], x, w, use_mad)
    for i in range(nstep + 1 if nstep >= 1 else 0):
        c = float(np.float32(rmin) + np.float32(rdelta) * np.float32(i) + np.float32(nmax))
        cand = _qkx_candidate(x, w, sum_w, sum_x, rdiv(c, mx - mn), mn, nmax, use_mad)
        take = (cand[0] > 0) & (cand[1] < best) & ~flat
        best, scale, mn = (torch.where(take, v, old) for v, old in
                           zip(cand[1:4], (best, scale, mn)))
        levels = torch.where(take[:, None], cand[4], levels)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    levels = torch.where(flat[:, None], torch.zeros_like(levels), levels)
    return scale, levels, -mn


def _qkx_candidate(x: torch.Tensor, w: torch.Tensor, sum_w: torch.Tensor, sum_x: torch.Tensor,
                   iscale: torch.Tensor, mn: torch.Tensor, nmax: int, use_mad: bool
                   ) -> tuple[torch.Tensor, ...]:
    """One pass of the ``is`` loop of ``make_qkx2/3_quants``: ``(D, mad, this_scale,
    this_min, Laux)``. Sequential per group (an accepted candidate's ``min`` is the next
    one's ``x[i] - min`` and ``max - min``), vectorised over groups."""
    lv = nearest_int(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)
    lf = lv.float()
    wl = w * lf
    sum_l, sum_l2, sum_xl = seq_sum(torch.stack([wl, wl * lf, wl * x]))
    D = sum_w * sum_l2 - sum_l * sum_l
    safe = torch.where(D > 0, D, torch.ones_like(D))
    t_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
    t_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
    pos = t_min > 0
    t_min = torch.where(pos, torch.zeros_like(t_min), t_min)
    t_scale = torch.where(pos, sum_xl / torch.where(sum_l2 != 0, sum_l2, 1.0), t_scale)
    mad = _error(t_scale[:, None], lv, t_min[:, None], x, w, use_mad)
    return D, mad, t_scale, t_min, lv


def _error(scale: torch.Tensor, levels: torch.Tensor, mn: torch.Tensor, x: torch.Tensor,
           w: torch.Tensor, use_mad: bool) -> torch.Tensor:
    """``sum += w * diff`` with ``diff = scale*L + min - x`` (``|diff|`` or ``diff²``)."""
    diff = (scale * levels.float() + mn) - x
    diff = diff.abs() if use_mad else diff * diff
    return seq_sum(w * diff)


def make_q3_quants(x: torch.Tensor, nmax: int, do_rmse: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants(n, nmax, x, L, do_rmse)``: symmetric levels ``L`` in ``[0, 2·nmax)``
    and the scale, weights ``x²``; with ``do_rmse`` up to 5 passes of one-level moves that
    raise ``sumlx²/suml2`` (a pass without a move ends the C loop, and changes nothing more)."""
    x = x.float()
    amax, mx = first_abs_max(x)
    zero = amax < GROUP_MAX_EPS
    iscale = rdiv(-nmax, torch.where(zero, torch.ones_like(mx), mx))
    levels = nearest_int(iscale[:, None] * x).clamp(-nmax, nmax - 1)
    if not do_rmse:
        return _zero_groups(_recip(iscale), levels + nmax, zero)
    w = x * x
    wx = w * x
    lf = levels.float()
    sumlx, suml2 = seq_sum(wx * lf), seq_sum((w * lf) * lf)
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[1]):
            li = levels[:, i].float()
            slx = sumlx - wx[:, i] * li
            sl2 = suml2 - (w[:, i] * li) * li
            new_l = nearest_int((x[:, i] * sl2) / slx).clamp(-nmax, nmax - 1)
            nf = new_l.float()
            slx_n = slx + wx[:, i] * nf
            sl2_n = sl2 + (w[:, i] * nf) * nf
            take = ((slx > 0) & (new_l != levels[:, i]) & (sl2_n > 0)
                    & ((slx_n * slx_n) * suml2 > (sumlx * sumlx) * sl2_n))
            levels[:, i] = torch.where(take, new_l, levels[:, i])
            sumlx = torch.where(take, slx_n, sumlx)
            suml2 = torch.where(take, sl2_n, suml2)
            changed |= take
        if not bool(changed.any()):
            break
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0),
                        torch.zeros_like(sumlx))
    return _zero_groups(scale, levels + nmax, zero)


def make_qp_quants(x: torch.Tensor, nmax: int, quant_weights: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qp_quants(n, nmax, x, L, quant_weights)``: levels ``L`` in ``[0, nmax]`` for
    non-negative ``x`` (the k-quants' sub-block scales and mins) and the scale; ``L`` is kept
    as the C ``uint8_t`` array holds it (a negative level wraps modulo 256)."""
    x, w = x.float(), quant_weights.float()
    mx = x.amax(dim=-1)
    zero = mx < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)[:, None]
    iscale = rdiv(nmax, mx)
    scale0 = _recip(iscale)
    diff = x - scale0 * (nearest_int(iscale * x) & 0xFF).float()
    best = seq_sum((w * diff) * diff)
    consts = torch.tensor([np.float32(0.1) * np.float32(i) + np.float32(nmax)
                           for i in range(-4, 5) if i != 0], dtype=torch.float32)
    iscales = consts[None, :] / mx                                        # [B, 8]
    lv = nearest_int(iscales[:, :, None] * x[:, None, :]).clamp(max=nmax).float()
    diff = x[:, None, :] - _recip(iscales)[:, :, None] * lv
    mse = seq_sum((w[:, None, :] * diff) * diff)
    for k in range(iscales.shape[1]):
        take = mse[:, k] < best
        best = torch.where(take, mse[:, k], best)
        iscale = torch.where(take[:, None], iscales[:, k:k + 1], iscale)
    ints = nearest_int(iscale * x).clamp(max=nmax)
    wx = w * x
    sumlx = seq_sum(wx * ints.float())
    suml2 = seq_sum((w * ints.float()) * ints.float())
    levels = ints & 0xFF
    sumlx, suml2 = _qp_refine(x, w, wx, levels, sumlx, suml2, nmax)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0),
                        torch.zeros_like(sumlx))
    return _zero_groups(scale, levels, zero)


def _qp_refine(x: torch.Tensor, w: torch.Tensor, wx: torch.Tensor, levels: torch.Tensor,
               sumlx: torch.Tensor, suml2: torch.Tensor, nmax: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``itry`` passes of ``make_qp_quants`` (``levels`` is updated in place)."""
    for _ in range(5):
        changed = torch.zeros_like(sumlx, dtype=torch.bool)
        for i in range(x.shape[1]):
            li = levels[:, i].float()
            slx = sumlx - wx[:, i] * li
            sl2 = suml2 - (w[:, i] * li) * li
            new_l = nearest_int((x[:, i] * sl2) / slx).clamp(max=nmax)
            nf = new_l.float()
            slx_n = slx + wx[:, i] * nf
            sl2_n = sl2 + (w[:, i] * nf) * nf
            take = ((slx > 0) & (sl2 > 0) & (new_l != levels[:, i])
                    & ((slx_n * slx_n) * suml2 > (sumlx * sumlx) * sl2_n))
            levels[:, i] = torch.where(take, new_l & 0xFF, levels[:, i])
            sumlx = torch.where(take, slx_n, sumlx)
            suml2 = torch.where(take, sl2_n, suml2)
            changed |= take
        if not bool(changed.any()):
            break
    return sumlx, suml2
