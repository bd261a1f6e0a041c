"""Scale searches shared by the GGUF codecs: llama.cpp's ``make_*_quants`` helpers as tensors.

Each helper mirrors one static function of ``ggml-quants.c`` for a batch of groups at once:
``x`` is ``[B, n]`` float32 (one group of ``n`` values per row) and everything the C code keeps
per group becomes a ``[B]`` tensor. The float32 arithmetic is the C code's, operation by
operation (no FMA, no reassociation): sums over a group are accumulated element by element in
the C order (:func:`seq_sum`), constants such as ``0.1f`` are float32 before use, and
``nearest_int`` is the ``12582912`` bit trick. The candidates of a search are evaluated one
after the other, in the C loop's order, each as a few tensor ops over every group at once; only
per-group numbers (sums, the best error, the chosen ``iscale``) are carried from one candidate
to the next, and the winning levels are recomputed once at the end from the chosen ``iscale``
(a candidate's levels are a function of it), so the result is what the sequential loop picks.

Internally the groups are held element-major (``[n, B]``, contiguous): the C-order sum over a
group is then ``n`` additions of contiguous ``[B]`` rows (one numpy ``add.reduce``, see
:func:`csum0`) rather than strided reads, and levels are kept as float32 (small integers,
exact) instead of int64. Where a search's products are known to be small (a per-group bound
below ``2²²``), ``nearest_int`` followed by a clamp is ``clamp`` then ``round`` (half to even,
as the bit trick); otherwise the bit trick itself runs (subnormal spans, inf, NaN). The
refinement passes of ``make_q3_quants`` / ``make_qp_quants`` run each pass after the first only
on the groups the previous pass changed (an unchanged group is final, as the C loop's break).
Everything here is pure float32 tensor maths; no float64 is needed for exactness.

``L`` (the integer levels) comes back as int64 ``[B, n]``.
"""
from __future__ import annotations

import struct

from quantbench.lazy import numpy as np, torch

GROUP_MAX_EPS = struct.unpack("<f", struct.pack("<f", 1e-15))[0]  # float32(1e-15)
_MAGIC = 12582912.0    # 1.5·2²³: ``fval + _MAGIC`` has ``nearest_int(fval)`` in its mantissa
_EXACT = 4194303.0     # |fval| below this: ``(fval + _MAGIC) - _MAGIC`` is that integer exactly


def f32(value: float) -> float:
    """``value`` rounded to float32 (a C ``float`` literal such as ``0.1f``)."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def nearest_int(fval: torch.Tensor) -> torch.Tensor:
    """``nearest_int``: round half to even through ``fval + 12582912.f``, as int64."""
    return _nearest_i32(fval).long()


def _nearest_i32(fval: torch.Tensor) -> torch.Tensor:
    val = (fval.float() + _MAGIC).view(torch.int32)
    return (val & 0x007FFFFF) - 0x00400000


def seq_sum(t: torch.Tensor, from_first: bool = False) -> torch.Tensor:
    """Sum over the last dim in C order: ``s = 0; for i: s += t[i]`` (``from_first``: start
    from ``t[0]`` instead of ``0``, as ``float s = t[0]; for i >= 1``)."""
    return csum0(t.movedim(-1, 0).contiguous(), from_first)


def csum0(t: torch.Tensor, from_first: bool = False) -> torch.Tensor:
    """:func:`seq_sum` over the first dim (element-major ``[n, ...]``, each step one contiguous
    row). numpy's ``add.reduce`` over axis 0 of a C-contiguous array adds whole rows into the
    accumulator one after the other, starting from ``initial`` (its pairwise summation is only
    for an innermost reduced axis), so ``s = 0; s += t[i]`` is one call. ``from_first`` (and a
    single column) keeps the explicit loop: numpy starts a reduction from +0, which differs
    from ``s = t[0]`` in the sign of an all ``-0`` sum."""
    t = t.float().contiguous()
    if not from_first and t.dim() >= 2 and t[0].numel() >= 2 and t.device.type == "cpu":
        out = np.add.reduce(t.numpy(), axis=0, initial=np.float32(0))
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
    acc = t[0].clone() if from_first else t[0] + 0.0     # 0 + t[0]: -0 becomes +0, as in C
    for i in range(1, t.shape[0]):
        acc += t[i]
    return acc


def first_abs_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The C loop ``amax = 0; max = 0; if (amax < fabsf(v)) { amax = fabsf(v); max = v; }``:
    ``(amax, max)`` with ``max`` the first element of largest magnitude (``+0`` if none).
    From the group's max and min when only one of them has the largest magnitude (two fast
    reductions); groups where both do (``±a``) or neither (NaN) take the index search."""
    hi, lo = x.amax(dim=-1), x.amin(dim=-1)
    amax = torch.maximum(hi, -lo)
    up, down = hi == amax, -lo == amax
    mx = torch.where(up, hi, lo)
    odd = (up == down) & ~(amax == 0)
    if x.dim() == 2 and bool(odd.any()):
        rows = odd.nonzero().squeeze(1)
        amax[rows], mx[rows] = _first_abs_max_search(x[rows])
    elif bool(odd.any()):
        return _first_abs_max_search(x)
    return amax, torch.where(amax > 0, mx, torch.zeros_like(mx))


def _first_abs_max_search(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    """C ``sqrtf``, correctly rounded. torch's float32 ``sqrt`` on CPU is not (with AVX512 it
    can be one ulp off); numpy's float32 ``sqrt`` is the IEEE instruction (``sqrtps``),
    correctly rounded like ``sqrtf``, without a float64 round trip."""
    t = t.float().contiguous()
    if t.device.type != "cpu":
        return t.double().sqrt().float()     # exact too: one rounding of the exact root
    return torch.from_numpy(np.sqrt(t.numpy()))


def _recip(t: torch.Tensor) -> torch.Tensor:
    """``1/t`` as one correctly rounded float32 division."""
    return torch.div(torch.ones_like(t), t)


def rdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """``c/t`` as one correctly rounded float32 division (``c`` a float32 value). Python's
    ``c / tensor`` is ``tensor.reciprocal() * c`` in torch: two roundings, off by an ulp."""
    return torch.div(torch.full_like(t, c), t)


def _qx_weights(xt: torch.Tensor, rmse_type: int, qw: torch.Tensor | None) -> torch.Tensor:
    if qw is not None:
        return qw.float().t().contiguous()
    if rmse_type == 1:
        return xt * xt
    if rmse_type == 2:
        return torch.ones_like(xt)
    if rmse_type == 3:
        return xt.abs()
    return sqrtf(xt.abs())


def _round_clamp(t: torch.Tensor, lo: float, hi: float, bound: torch.Tensor) -> torch.Tensor:
    """``nearest_int(t)`` clamped to ``[lo, hi]`` (integers), float32; ``t`` is overwritten.
    ``bound`` is a per-group ``[B]`` upper bound of ``|t|`` over the group (by monotonicity of
    float32 rounding ``fl(max|a|·|s|)`` bounds every ``fl(a·s)``): when all of them are below
    ``2²² - 1`` the bit trick is round-half-even, and clamping first changes nothing, so it is
    two ops (``clamp``, ``round``); otherwise (a span that underflows, inf/NaN) the bit trick."""
    if bool((bound < _EXACT).all()):
        return t.clamp_(lo, hi).round_()
    return _nearest_i32(t).clamp_(int(lo), int(hi)).float()


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

    def levels_for(iscale: torch.Tensor) -> torch.Tensor:
        return nearest_int(iscale[:, None] * x).clamp(-nmax, nmax - 1) + nmax

    if rmse_type == 0:
        return _zero_groups(_recip(iscale0), levels_for(iscale0), zero)
    xt = x.t().contiguous()                                              # [n, B]
    w = _qx_weights(xt, abs(rmse_type), qw)
    wx = w * xt
    buf = torch.empty((xt.shape[0], 2, xt.shape[1]), dtype=torch.float32)

    def sums(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sumlx, suml2)`` of one candidate: ``Σ w·x·l`` and ``Σ (w·l)·l`` in C order."""
        lv = _round_clamp(iscale * xt, -nmax, nmax - 1, iscale.abs() * amax)
        torch.mul(wx, lv, out=buf[:, 0])
        torch.mul(w, lv, out=buf[:, 1])
        buf[:, 1].mul_(lv)
        s = csum0(buf)
        return s[0], s[1]

    s0, l2 = sums(iscale0)
    scale = torch.where(l2 != 0, s0 / torch.where(l2 != 0, l2, 1.0), torch.zeros_like(s0))
    if rmse_type < 0:
        early = torch.where(l2 > 0, 0.5 * (scale + _recip(iscale0)), _recip(iscale0))
        return _zero_groups(early, levels_for(iscale0), zero)
    best, chosen = scale * s0, iscale0
    for i in (i for i in range(-9, 10) if i != 0):
        c = -(np.float32(nmax) + np.float32(0.1) * np.float32(i))
        iscale = torch.div(torch.full_like(mx, float(c)), mx)
        sx, s2 = sums(iscale)
        take = (s2 > 0) & (sx * sx > best * s2)
        scale = torch.where(take, sx / torch.where(take, s2, 1.0), scale)
        best = torch.where(take, scale * sx, best)
        chosen = torch.where(take, iscale, chosen)
    return _zero_groups(scale, levels_for(chosen), zero)


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
    xt = x.t().contiguous()                                              # [n, B]
    w = xt * xt if weights is None else weights.float().t().contiguous()
    mn, mx = first_min(x), first_max(x)
    lowest = mn
    sum_w = csum0(w, from_first=True)
    sum_x = csum0(w * xt, from_first=True)
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx <= mn
    span = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = rdiv(nmax, span)
    scale = _recip(iscale)
    buf = torch.empty((xt.shape[0], 3, xt.shape[1]), dtype=torch.float32)
    lv_buf, diff = torch.empty_like(xt), torch.empty_like(xt)   # reused by every candidate

    def levels(iscale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
        """``nearest_int(iscale·(x − min))`` clamped to ``[0, nmax]`` (in ``lv_buf``);
        ``|x − min|`` is at most ``max(|max − min|, |lowest − min|)``."""
        bound = torch.maximum((mx - mn).abs(), (lowest - mn).abs()).mul_(iscale.abs())
        return _round_clamp(torch.sub(xt, mn, out=lv_buf).mul_(iscale), 0, nmax, bound)

    def error(scale: torch.Tensor, lv: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
        """``sum += w * diff`` with ``diff = scale*L + min - x`` (``|diff|`` or ``diff²``)."""
        d = torch.mul(lv, scale, out=diff).add_(mn).sub_(xt)
        d = d.abs_() if use_mad else d.mul_(d)
        return csum0(d.mul_(w))

    best = error(scale, levels(iscale, mn), mn)
    chosen_is, chosen_mn = iscale, mn                  # the levels' (iscale, min) so far
    for i in range(nstep + 1 if nstep >= 1 else 0):
        c = float(np.float32(rmin) + np.float32(rdelta) * np.float32(i) + np.float32(nmax))
        # ``c/(max - min)``; flat groups never accept a candidate, so any finite divisor does
        iscale = rdiv(c, torch.where(flat, torch.ones_like(mx), mx - mn))
        lv = levels(iscale, mn)
        torch.mul(w, lv, out=buf[:, 0])
        torch.mul(buf[:, 0], lv, out=buf[:, 1])
        torch.mul(buf[:, 0], xt, out=buf[:, 2])
        sum_l, sum_l2, sum_xl = csum0(buf)
        D = sum_w * sum_l2 - sum_l * sum_l
        safe = torch.where(D > 0, D, torch.ones_like(D))
        t_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        t_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        pos = t_min > 0
        t_min = torch.where(pos, torch.zeros_like(t_min), t_min)
        t_scale = torch.where(pos, sum_xl / torch.where(sum_l2 != 0, sum_l2, 1.0), t_scale)
        mad = error(t_scale, lv, t_min)
        take = (D > 0) & (mad < best) & ~flat
        chosen_is = torch.where(take, iscale, chosen_is)
        chosen_mn = torch.where(take, mn, chosen_mn)
        best = torch.where(take, mad, best)
        scale = torch.where(take, t_scale, scale)
        mn = torch.where(take, t_min, mn)
    lv = nearest_int(chosen_is[:, None] * (x - chosen_mn[:, None])).clamp(0, nmax)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    lv = torch.where(flat[:, None], torch.zeros_like(lv), lv)
    return scale, lv, -mn


def make_q3_quants(x: torch.Tensor, nmax: int, do_rmse: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants(n, nmax, x, L, do_rmse)``: symmetric levels ``L`` in ``[0, 2·nmax)``
    and the scale, weights ``x²``; with ``do_rmse`` up to 5 passes of one-level moves that
    raise ``sumlx²/suml2`` (a pass without a move ends the C loop, and changes nothing more)."""
    x = x.float()
    amax, mx = first_abs_max(x)
    zero = amax < GROUP_MAX_EPS
    iscale = rdiv(-nmax, torch.where(zero, torch.ones_like(mx), mx))
    if not do_rmse:
        levels = nearest_int(iscale[:, None] * x).clamp(-nmax, nmax - 1)
        return _zero_groups(_recip(iscale), levels + nmax, zero)
    xt = x.t().contiguous()                                              # [n, B]
    lv = _round_clamp(iscale * xt, -nmax, nmax - 1, iscale.abs() * amax)
    w = xt * xt
    wx = w * xt
    sumlx, suml2 = csum0(wx * lv), csum0((w * lv) * lv)
    sumlx, suml2 = _refine(xt, w, wx, lv, sumlx, suml2, -nmax, nmax - 1, True)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0),
                        torch.zeros_like(sumlx))
    return _zero_groups(scale, lv.t().long() + nmax, zero)


def _refine(xt: torch.Tensor, w: torch.Tensor, wx: torch.Tensor, lv: torch.Tensor,
            sumlx: torch.Tensor, suml2: torch.Tensor, lo: int, hi: int, q3: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The up-to-5 passes of one-level moves of ``make_q3_quants`` (``q3``) and
    ``make_qp_quants`` over element-major ``[n, B]`` tensors; ``lv`` (float levels, for
    ``make_qp_quants`` already wrapped to ``uint8_t``) is updated in place. A pass that moves
    nothing in a group ends the C loop for that group (the next pass would repeat the same
    steps), so each pass after the first runs only on the groups the previous pass moved."""
    groups = None                                   # indices of the groups in play; None: all
    cur = (xt, w, wx, lv)
    for _ in range(5):
        gx, gw, gwx, glv = cur
        moved = torch.zeros_like(sumlx, dtype=torch.bool)
        for i in range(gx.shape[0]):
            li = glv[i]
            slx = sumlx - gwx[i] * li
            sl2 = suml2 - (gw[i] * li) * li
            new_i = _nearest_i32((gx[i] * sl2) / slx).clamp_(min=lo, max=hi)
            nf = new_i.float()
            slx_n = slx + gwx[i] * nf
            sl2_n = sl2 + (gw[i] * nf) * nf
            ok = (slx > 0) & (sl2_n > 0) if q3 else (slx > 0) & (sl2 > 0)
            take = (ok & (nf != li)
                    & ((slx_n * slx_n) * suml2 > (sumlx * sumlx) * sl2_n))
            glv[i] = torch.where(take, nf if q3 else (new_i & 0xFF).float(), li)
            sumlx = torch.where(take, slx_n, sumlx)
            suml2 = torch.where(take, sl2_n, suml2)
            moved |= take
        if groups is None:
            all_sumlx, all_suml2 = sumlx, suml2
        else:
            lv[:, groups], all_sumlx[groups], all_suml2[groups] = glv, sumlx, suml2
        moved = moved.nonzero().squeeze(1)
        if moved.numel() == 0:
            break
        groups = moved if groups is None else groups[moved]
        cur = tuple(t[:, moved] for t in cur)
        sumlx, suml2 = sumlx[moved], suml2[moved]
    return all_sumlx, all_suml2


def make_qp_quants(x: torch.Tensor, nmax: int, quant_weights: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qp_quants(n, nmax, x, L, quant_weights)``: levels ``L`` in ``[0, nmax]`` for
    non-negative ``x`` (the k-quants' sub-block scales and mins) and the scale; ``L`` is kept
    as the C ``uint8_t`` array holds it (a negative level wraps modulo 256)."""
    x = x.float()
    mx = x.amax(dim=-1)
    zero = mx < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    xt = x.t().contiguous()                                              # [n, B]
    w = quant_weights.float().t().contiguous()
    iscale = rdiv(nmax, mx)

    def mse(iscale: torch.Tensor, wrap: bool) -> torch.Tensor:
        lv = _nearest_i32(iscale * xt)
        lv = (lv & 0xFF) if wrap else lv.clamp_(max=nmax)
        diff = xt - _recip(iscale) * lv.float()
        return csum0((w * diff) * diff)

    best = mse(iscale, True)
    for i in (i for i in range(-4, 5) if i != 0):
        c = float(np.float32(0.1) * np.float32(i) + np.float32(nmax))
        cand = torch.div(torch.full_like(mx, c), mx)
        err = mse(cand, False)
        take = err < best
        best = torch.where(take, err, best)
        iscale = torch.where(take, cand, iscale)
    ints = _nearest_i32(iscale * xt).clamp_(max=nmax)
    lf = ints.float()
    wx = w * xt
    sumlx = csum0(wx * lf)
    suml2 = csum0((w * lf) * lf)
    lv = (ints & 0xFF).float()
    sumlx, suml2 = _refine(xt, w, wx, lv, sumlx, suml2, -(1 << 30), nmax, False)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0),
                        torch.zeros_like(sumlx))
    return _zero_groups(scale, lv.t().long(), zero)
