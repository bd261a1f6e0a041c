"""The EXL2 grid as pure tensor functions (FORMATS.md §4.2, §4.3, §4.6).

A weight ``[out, in]`` is handled in act-order: processing row ``r`` is input column
``perm[r]``. The rows are cut into consecutive groups by the mix (:func:`group_layout`); a
group of ``b``-bit codes has one fp16 ``qscale_max`` and, per output channel, a scale code
``qscale ∈ 1..16``. Its scale is ``fp16(fp16(qscale²)·fp16(qscale_max/256))`` and a code ``q``
dequantizes to ``fp16((q − 2^(b−1))·scale)``: exactly the half-precision products exllamav2's
kernels form (``dq_scale``, ``dq``), so what we evaluate is what the runtime computes.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from quantbench.lazy import torch

if TYPE_CHECKING:
    from quantbench.quant.grids.exl2 import EXL2GridConfig

SCALE_CODES = 16                 # 4-bit scale codes 1..16 (stored minus one)
MIN_P, MAX_P, P_STEPS = 0.70, 1.20, 21   # the search over qscale_max (exllamav2: 0.70..1.20)


def group_layout(grid: EXL2GridConfig, rows: int) -> list[tuple[int, int]]:
    """``(bits, rows)`` of every group in processing order: for each width in turn,
    ``ceil(min(rows·p, remaining)/g)`` groups of ``g`` rows (exllamav2's
    ``AdaptiveGPTQ.configure``, float arithmetic included); the last group may be short and
    a width left without rows gets no group."""
    if grid.is_target:
        raise ValueError("a bpw target has no layout; each tensor gets its own mix")
    groups: list[tuple[int, int]] = []
    remaining = rows
    for bits, prop, size in zip(grid.widths, grid.proportions, grid.group_sizes):
        count = max(0, math.ceil(min(rows * prop, remaining) / size))
        for _ in range(count):
            if remaining <= 0:
                break
            groups.append((bits, min(size, remaining)))
            remaining -= size
    if remaining > 0:
        raise ValueError(f"mix {grid.desc} leaves {remaining} of {rows} rows without a group")
    return groups


def row_bits(layout: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per processing row: its code width and its group index (int64 ``[rows]`` each)."""
    bits = torch.tensor([b for b, n in layout for _ in range(n)], dtype=torch.int64)
    group = torch.tensor([i for i, (_, n) in enumerate(layout) for _ in range(n)],
                         dtype=torch.int64)
    return bits, group


def total_bits(grid: EXL2GridConfig, in_features: int, out_features: int,
               bias_numel: int = 0) -> int:
    """Bits exllamav2 counts for one linear (``QParams.total_bits``, FORMATS.md §4.6): codes,
    ``q_scale_max`` (16/group), ``q_groups`` (32/group), ``q_scale`` (4 per group and output),
    ``q_invperm`` (32 per input) and a 16-bit bias."""
    layout = group_layout(grid, in_features)
    n_groups = len(layout)
    codes = sum(rows * out_features * bits for bits, rows in layout)
    return (codes + n_groups * (16 + 32 + 4 * out_features) + 32 * in_features
            + 16 * bias_numel)


def scales_from_codes(qscale: torch.Tensor, qscale_max: torch.Tensor) -> torch.Tensor:
    """fp16 scales ``fp16(qscale²)·fp16(qscale_max/256)``, rounded once as a half product
    (``qscale`` integer ``[..., G]`` or ``[G]``, ``qscale_max`` broadcastable)."""
    square = (qscale.to(torch.float32) ** 2).to(torch.float16)
    prescaled = (qscale_max.to(torch.float32) / 256).to(torch.float16)
    return (square.float() * prescaled.float()).to(torch.float16)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: "torch.Tensor | int"
                     ) -> torch.Tensor:
    """``fp16((code − zero)·scale)`` as float32 (a half product: exact, then one rounding)."""
    return ((codes.float() - zero) * scale.float()).to(torch.float16).float()


RINT_MAGIC = 12582912.0  # 1.5·2^23: (x + M) − M is float32 round-half-even for |x| < 2^22


def rint(x: torch.Tensor) -> torch.Tensor:
    """``rintf`` (round half to even) of float32 values whose magnitude matters only up to 2^22
    (larger ones are clamped first): the same result as ``torch.round`` in two additions
    (on a contended CPU, ``torch.round`` cost milliseconds per call in the column sweep)."""
    return (x.clamp(-4194304.0, 4194304.0) + RINT_MAGIC) - RINT_MAGIC


def round_signed(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(rint(w/scale), −2^(b−1), 2^(b−1) − 1)``: the code minus its zero (float).
    Clamping before rounding to integer bounds gives the same as after; a zero scale (fp16
    underflow) gives a clamped code that dequantizes to 0 like any other."""
    lo, hi = -float(1 << (bits - 1)), float((1 << (bits - 1)) - 1)
    return (torch.clamp(w / scale.float().clamp_min(1e-30), lo, hi) + RINT_MAGIC) - RINT_MAGIC


def round_codes(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest symmetric codes ``clamp(rint(w/scale) + 2^(b−1), 0, 2^b − 1)`` (float); a
    zero scale (an all-zero group) gives the zero code."""
    zero = float(1 << (bits - 1))
    q = round_signed(w.float(), scale, bits) + zero
    return torch.where(scale.float() > 0, q, torch.full_like(q, zero))


def _errors(w: torch.Tensor, scales: torch.Tensor, bits: int, importance: torch.Tensor
            ) -> torch.Tensor:
    """``Σ_c importance[c]·(w − deq)²`` per option and channel: ``w [out, rows]``, ``scales
    [K, out]`` → ``[K, out]``; options in batches of about 2^16 values (few large ops: the
    fit runs at every group start of every sweep)."""
    scales = scales.float()
    per = max(1, ERROR_BATCH_ELEMENTS // max(w.numel(), 1))
    out = []
    for k in range(0, scales.shape[0], per):
        s = scales[k:k + per].unsqueeze(-1)                                 # [k, out, 1]
        deq = (round_signed(w, s, bits) * s).to(torch.float16).float()      # [k, out, rows]
        out.append(deq.sub_(w).square_() @ importance)
    return torch.cat(out)


ERROR_BATCH_ELEMENTS = 1 << 16   # 256 KiB temporaries: below the mmap threshold, no page faults


def fit_group(w: torch.Tensor, bits: int, importance: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale parameters for one group ``w [out, rows]`` (float32): ``(qscale uint8 [out] in
    1..16, qscale_max fp16 scalar)``.

    Start as exllamav2 does (``AdaptiveQuantizer.find_params``): per channel the absmax scale
    ``absmax/((2^b − 1)/2)``, ``qscale_max`` the largest, ``qscale = round(16·√(scale/max))``.
    Then pick the factor on ``qscale_max`` in [0.70, 1.20] with the least error, and finally
    move each channel's scale code by up to ±2 where that lowers its error. The error is
    ``Σ importance·(w − deq)²`` (``importance`` per row, e.g. GPTQ's ``diag(H)``; uniform when
    None); both searches include the starting point, so they never make it worse."""
    w = w.float()
    imp = torch.ones(w.shape[1], device=w.device) if importance is None else \
        importance.float().clamp(min=0).to(w.device)
    base = (w.abs().amax(dim=1) + 1e-12) / (((1 << bits) - 1) / 2)
    top = base.max()
    qscale = torch.clamp(rint(torch.sqrt(base / top) * SCALE_CODES), 1, SCALE_CODES)
    factors = torch.linspace(MIN_P, MAX_P, P_STEPS, device=w.device)
    factors = torch.cat([torch.ones(1, device=w.device), factors])
    qmax_options = (top * factors).to(torch.float16)                       # [P]
    scales = scales_from_codes(qscale.unsqueeze(0), qmax_options.unsqueeze(1))   # [P, out]
    qscale_max = qmax_options[int(torch.argmin(_errors(w, scales, bits, imp).sum(dim=1)))]
    steps = torch.tensor([0.0, -1.0, 1.0, -2.0, 2.0], device=w.device).unsqueeze(1)
    options = torch.clamp(qscale.unsqueeze(0) + steps, 1, SCALE_CODES)   # [5, out], start first
    err = _errors(w, scales_from_codes(options, qscale_max), bits, imp)
    best = torch.argmin(err, dim=0, keepdim=True)                           # first of ties
    return options.gather(0, best).squeeze(0).to(torch.uint8), qscale_max


def dequantize_exl2(codes: torch.Tensor, qscale: torch.Tensor, qscale_max: torch.Tensor,
                    perm: torch.Tensor, grid: EXL2GridConfig) -> torch.Tensor:
    """Float32 weight ``[out, in]`` from codes in original column order, scale codes
    ``[out, G]``, ``qscale_max [G]`` and the processing order ``perm [in]``."""
    out_f, in_f = codes.shape
    bits, group = row_bits(group_layout(grid, in_f))
    bits, group = bits.to(codes.device), group.to(codes.device)
    perm = perm.long()
    scale = scales_from_codes(qscale, qscale_max)[:, group]                 # [out, in] proc
    w_proc = dequantize_codes(codes[:, perm], scale, (1 << (bits - 1)).unsqueeze(0))
    w = torch.empty(out_f, in_f, dtype=torch.float32, device=codes.device)
    w[:, perm] = w_proc
    return w
