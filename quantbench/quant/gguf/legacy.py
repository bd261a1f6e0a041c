"""The float and "legacy" ggml types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

Byte for byte what llama.cpp's ``ggml_quantize_chunk`` writes (``ggml-quants.c``): without
an importance vector each block follows ``quantize_row_<type>_ref``; with one,
``quantize_row_<type>_impl`` (Q8_0 has no ``_impl`` and ignores it). The ``_impl`` weights
use ``sigma2 = Σx²/n_per_row`` over the whole row, so :meth:`quantize_rows` is the entry point
that matches llama.cpp with an imatrix; :meth:`quantize` on loose blocks takes ``sigma2`` per
block, or treats each block as a row of its own.

Block layouts (``ggml-common.h``), fp16 little endian: Q4_0 ``d, qs[16]``; Q4_1 ``d, m,
qs[16]``; Q5_0 ``d, qh[4], qs[16]``; Q5_1 ``d, m, qh[4], qs[16]``; Q8_0 ``d, qs[32]`` (int8).
Nibble ``j`` of ``qs`` holds element ``j`` (low) and ``j + 16`` (high); bit ``j`` of ``qh``
is bit 4 of element ``j``.

Like the k-quants, every quantized type is split so that GPTQ on GGUF can fit a block's grid
once and round its columns itself: :meth:`_LegacyCodec.fit` ``(x, importance, sigma2) ->
LegacyParams`` (the ref/impl search; its own levels are llama.cpp's codes, kept as
``fallback``), :meth:`~_LegacyCodec.element_grid` (an element decodes to ``scale·(code −
zero_point) − offset``), :meth:`~_LegacyCodec.round_to_grid` / :meth:`~_LegacyCodec.codes_for`
and :meth:`~_LegacyCodec.pack`. ``quantize`` is ``pack(fit(x).fallback, fit(x))``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from quantbench.lazy import numpy as np, torch
from quantbench.quant.gguf.codec import BlockCodec, register_codec
from quantbench.quant.gguf.search import (f32, first_abs_max, first_max, first_min,
                                          make_qkx3_quants, make_qx_quants, nearest_int,
                                          seq_sum, sqrtf)

_CHUNK = 8192  # blocks per pass of an ``_impl`` search (bounds its [32, blocks] temporaries)
_HALF_DOWN = f32(0.49999997)  # the float below 0.5: ``trunc(v + copysign(it, v))`` is roundf


@dataclass
class LegacyParams:
    """One legacy type's per-block parameters (``N`` blocks of 32)."""

    d: torch.Tensor         # [N] float32: the block scale before its fp16 store
    m: torch.Tensor         # [N] float32: the block min (Q4_1/Q5_1) before fp16, else 0
    fallback: torch.Tensor  # [N, 32] int32/int64: the search's own levels (llama.cpp's codes)

    @staticmethod
    def cat(parts: list[LegacyParams]) -> LegacyParams:
        return LegacyParams(*(torch.cat([getattr(p, f.name) for p in parts])
                              for f in fields(LegacyParams)))


# ---------------------------------------------------------------- float conversions (ggml-impl.h)

def fp16_bits(x: torch.Tensor) -> torch.Tensor:
    """``ggml_compute_fp32_to_fp16``: round to nearest even, NaN → ``sign | 0x7E00``; int16."""
    x = x.float().contiguous()
    nan = ((x.view(torch.int32) >> 16) & 0x8000) | 0x7E00
    return torch.where(x.isnan(), _as_int16(nan), x.half().view(torch.int16))


def bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """``ggml_compute_fp32_to_bf16``: round to nearest even, NaN forced quiet; int16."""
    u = x.float().contiguous().view(torch.int32).long() & 0xFFFFFFFF
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    return _as_int16(torch.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 64, rounded))


def _as_int16(v: torch.Tensor) -> torch.Tensor:
    """The low 16 bits of an integer tensor as int16 (two's complement)."""
    return (((v & 0xFFFF) ^ 0x8000) - 0x8000).to(torch.int16)


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    return fp16_bits(x).contiguous().view(torch.uint8).reshape(-1, 2)


def _fp16_value(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float().reshape(-1, 1)


def _div(t: torch.Tensor, c: int) -> torch.Tensor:
    """``t / c`` as one float32 division (not a multiply by a rounded ``1/c``)."""
    return torch.div(t, torch.full_like(t, float(c)))


def _c_int8(v: torch.Tensor) -> torch.Tensor:
    """``(int8_t)v`` for a float as x86-64 gcc does it: ``cvttss2si`` (truncate; NaN and out of
    range give INT_MIN) and keep the low byte, sign-extended; int64."""
    ok = (v >= -2147483648.0) & (v < 2147483648.0)
    i32 = torch.where(ok, torch.where(ok, v, 0.0).trunc().long(), -2147483648)
    return ((i32 & 0xFF) ^ 0x80) - 0x80


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: half away from zero (``v - trunc(v)`` is exact)."""
    t = v.trunc()
    return torch.where((v - t).abs() >= 0.5, t + v.sign(), t)


def _roundf_int(v: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` of ``v`` (finite, ``|v| < 2³¹``) as int32, in three ops:
    ``(int)(v ± 0.49999997f)`` (the conversion truncates). Adding the float just below one half
    reaches the next integer exactly when ``v`` is at or past a .5 tie (``k.5 + 0.49999997``
    rounds up to ``k+1`` since the spacing there is at least ``2⁻²³``; below a tie the sum
    stays under ``k+1``), and for ``|v| < 0.5`` it stays below 1."""
    return v.sign().mul_(_HALF_DOWN).add_(v).int()


def _within(v: torch.Tensor, lo: float, hi: float) -> bool:
    """Every value of ``v`` in the open interval ``(lo, hi)`` (False with a NaN)."""
    if v.numel() == 0:
        return True
    vmin, vmax = torch.aminmax(v)
    return bool((vmin > lo) & (vmax < hi))


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """``qs[j] = q[j] | q[j + 16] << 4`` for 32 levels in ``[0, 16)`` (low nibble of each)."""
    return ((q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)).to(torch.uint8)


def _pack_qh(q: torch.Tensor) -> torch.Tensor:
    """The 32 fifth bits as the little-endian ``uint32_t qh``: ``[B, 4]`` bytes."""
    bits = ((q.cpu() >> 4) & 1).to(torch.uint8).numpy()
    return torch.from_numpy(np.packbits(bits, axis=-1, bitorder="little"))


# The unpackers stay in uint8 (every code fits: at most 31), a quarter of int64's traffic.
def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _unpack_qh(qh: torch.Tensor) -> torch.Tensor:
    return ((qh[:, :, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1, 32) << 4


# ---------------------------------------------------------------------------- float types

@register_codec
class F32Codec(BlockCodec):
    """``GGML_TYPE_F32``: the float32 bytes as they are."""

    name, type_id, block_size, type_size = "F32", 0, 1, 4

    def quantize(self, x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        return x.float().contiguous().reshape(-1).view(torch.uint8).reshape(-1, 4)

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().reshape(-1).view(torch.float32).reshape(-1, 1)


@register_codec
class F16Codec(BlockCodec):
    """``GGML_TYPE_F16``: ``ggml_fp32_to_fp16_row``."""

    name, type_id, block_size, type_size = "F16", 1, 1, 2

    def quantize(self, x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        return fp16_bits(x.reshape(-1)).view(torch.uint8).reshape(-1, 2)

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        return _fp16_value(blocks.reshape(-1, 2))


@register_codec
class BF16Codec(BlockCodec):
    """``GGML_TYPE_BF16``: ``ggml_fp32_to_bf16_row_ref``."""

    name, type_id, block_size, type_size = "BF16", 30, 1, 2

    def quantize(self, x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        return bf16_bits(x.reshape(-1)).view(torch.uint8).reshape(-1, 2)

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        h = blocks.contiguous().view(torch.int16).reshape(-1, 1).int() << 16
        return h.view(torch.float32)


# ----------------------------------------------------------------- Q4_0 / Q5_0 / Q4_1 / Q5_1

class _LegacyCodec(BlockCodec):
    """The 32-element legacy quants: ``ref`` without importance, ``_impl`` with it."""

    block_size = 32
    zero_point: int = 0     # code of the value 0 (Q4_0: 8, Q5_0: 16)
    code_min: int = 0       # smallest code the block stores (Q8_0: -128, as int8)
    code_max: int = 15      # largest code
    has_min: bool = False   # Q4_1 / Q5_1: x = d·q + m

    def quantize(self, x: torch.Tensor, importance: torch.Tensor | None = None,
                 sigma2: torch.Tensor | None = None) -> torch.Tensor:
        """``sigma2`` ``[n_blocks]``: each block's row ``Σx²/n_per_row`` (``_impl`` only);
        left out, every block counts as a row of its own."""
        params = self.fit(x, importance, sigma2)
        return self.pack(params.fallback, params)

    def fit(self, x: torch.Tensor, importance: torch.Tensor | None = None,
            sigma2: torch.Tensor | None = None) -> LegacyParams:
        """The ref (no importance) or ``_impl`` search over ``[N, 32]`` blocks."""
        x = x.float()
        if importance is None or x.shape[0] == 0:
            return self._ref(x)
        if sigma2 is None:
            sigma2 = row_sigma2(x)
        return LegacyParams.cat([self._impl(x[i:i + _CHUNK], importance[i:i + _CHUNK].float(),
                                            sigma2[i:i + _CHUNK])
                                 for i in range(0, x.shape[0], _CHUNK)])

    def element_grid(self, params: LegacyParams) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, offset)`` ``[N, 32]`` float32 as the dequantizer sees them (fp16 values):
        an element decodes to ``scale·(code − zero_point) − offset``."""
        scale = _fp16_value(_fp16_bytes(params.d)).expand(-1, self.block_size)
        offset = -_fp16_value(_fp16_bytes(params.m)) if self.has_min else \
            torch.zeros_like(params.d)[:, None]
        return scale, offset.expand(-1, self.block_size)

    gptq_capable: ClassVar[bool] = True

    def round_to_grid(self, x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                      fallback: torch.Tensor) -> torch.Tensor:
        """Elementwise: ``nearest_int((x + offset)/scale) + zero_point`` clamped to the codes,
        and ``fallback`` where ``scale == 0``; int64."""
        dead = scale == 0
        q = nearest_int((x.float() + offset) / torch.where(dead, torch.ones_like(scale), scale))
        q = q.clamp(self.code_min - self.zero_point, self.code_max - self.zero_point)
        return torch.where(dead, fallback, q + self.zero_point)

    def codes_for(self, x: torch.Tensor, params: LegacyParams) -> torch.Tensor:
        """Codes ``[N, 32]`` for ``x`` rounded to the stored grid of ``params``."""
        scale, offset = self.element_grid(params)
        return self.round_to_grid(x, scale, offset, params.fallback)

    def dequantize_codes(self, codes: torch.Tensor, params: LegacyParams) -> torch.Tensor:
        scale, offset = self.element_grid(params)
        return scale * (codes - self.zero_point).float() - offset

    def pack(self, codes: torch.Tensor, params: LegacyParams) -> torch.Tensor:
        raise NotImplementedError

    def quantize_row_chunk(self, w: torch.Tensor, importance: torch.Tensor | None
                           ) -> torch.Tensor:
        """Rows as ``quantize_<type>`` does them: with importance, ``sigma2`` per row."""
        if importance is None:
            return super().quantize_row_chunk(w, None)
        rows, cols = w.shape
        sigma2 = row_sigma2(w).repeat_interleave(cols // self.block_size)
        imp = importance.expand(rows, cols).reshape(-1, self.block_size)
        return self.quantize(w.reshape(-1, self.block_size), imp, sigma2).reshape(rows, -1)

    def _ref(self, x: torch.Tensor) -> LegacyParams:
        raise NotImplementedError

    def _impl(self, x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> LegacyParams:
        raise NotImplementedError


def row_sigma2(x: torch.Tensor) -> torch.Tensor:
    """``sum_x2 += x[j]*x[j]`` over a row in order, then ``sum_x2/n_per_row`` (the ``_impl``
    functions' ``sigma2``); ``x`` is ``[rows, n_per_row]``."""
    return seq_sum(x * x) / f32(x.shape[1])


def _impl_weights(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """``weight[j] = qw[j] * sqrtf(sigma2 + xb[j]*xb[j])``."""
    return qw * sqrtf(sigma2[:, None] + x * x)


# ------------------------------------------------------------------------------ Q8_0

@register_codec
class Q8_0Codec(_LegacyCodec):
    """``GGML_TYPE_Q8_0``: ``quantize_row_q8_0_ref`` (llama.cpp ignores the imatrix)."""

    name, type_id, block_size, type_size = "Q8_0", 8, 32, 34
    scale_offsets = (0,)           # d
    code_min, code_max = -128, 127

    def _ref(self, x: torch.Tensor) -> LegacyParams:
        d = _div(x.abs().amax(dim=1), 127)
        inv = torch.where(d != 0, torch.div(torch.ones_like(d), d), torch.zeros_like(d))
        v = x * inv[:, None]
        if _within(v, -127.5, 127.5):    # roundf(v) fits int8: the store is the value
            return LegacyParams(d, torch.zeros_like(d), _roundf_int(v))
        return LegacyParams(d, torch.zeros_like(d), _c_int8(_roundf(v)))

    def _impl(self, x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> LegacyParams:
        return self._ref(x)

    def pack(self, codes: torch.Tensor, params: LegacyParams) -> torch.Tensor:
        return torch.cat([_fp16_bytes(params.d), codes.to(torch.int8).view(torch.uint8)], dim=1)

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        q = blocks[:, 2:].contiguous().view(torch.int8).float()
        return q * _fp16_value(blocks[:, :2])


class _SymmetricCodec(_LegacyCodec):
    """Q4_0 / Q5_0: ``d = max / -(nmax)`` from the element of largest magnitude."""

    scale_offsets = (0,)           # d
    nmax = 8
    has_min = False

    def _ref(self, x: torch.Tensor) -> LegacyParams:
        _, mx = first_abs_max(x)
        d = _div(mx, -self.nmax)
        inv = torch.where(d != 0, torch.div(torch.ones_like(d), d), torch.zeros_like(d))
        v = x * inv[:, None] + (self.nmax + 0.5)
        if _within(v, -1.0, 128.0):      # (int8_t)v is trunc(v), no wrap
            q = v.int().clamp_(max=2 * self.nmax - 1)
            return LegacyParams(d, torch.zeros_like(d), q)
        q = _c_int8(v)
        return LegacyParams(d, torch.zeros_like(d), q.clamp(max=2 * self.nmax - 1) & 0xFF)

    def _impl(self, x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> LegacyParams:
        d, levels = make_qx_quants(x, self.nmax, 1, _impl_weights(x, qw, sigma2))
        return LegacyParams(d, torch.zeros_like(d), levels)

    def pack(self, codes: torch.Tensor, params: LegacyParams) -> torch.Tensor:
        d, q = params.d, codes.long()
        if self.nmax == 8:
            return torch.cat([_fp16_bytes(d), _pack_nibbles(q)], dim=1)
        return torch.cat([_fp16_bytes(d), _pack_qh(q), _pack_nibbles(q)], dim=1)

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        q = _unpack_nibbles(blocks[:, -16:])
        if self.nmax == 16:
            q = q | _unpack_qh(blocks[:, 2:6])
        return _fp16_value(blocks[:, :2]) * (q.float() - self.nmax)


class _AffineCodec(_LegacyCodec):
    """Q4_1 / Q5_1: ``d = (max - min) / nmax``, ``m = min``."""

    scale_offsets = (0, 2)         # d, m
    nmax = 15
    has_min = True

    def _ref(self, x: torch.Tensor) -> LegacyParams:
        mn, mx = first_min(x), first_max(x)
        d = _div(mx - mn, self.nmax)
        inv = torch.where(d != 0, torch.div(torch.ones_like(d), d), torch.zeros_like(d))
        v = (x - mn[:, None]) * inv[:, None] + 0.5
        fast = _within(v, -1.0, 128.0)   # (int8_t)v is trunc(v), no wrap
        q = v.int() if fast else _c_int8(v)
        if self.nmax == 15:        # Q4_1 clamps with MIN(15, ...); Q5_1 only casts to uint8
            q = q.clamp(max=15)
        return LegacyParams(d, mn, q if fast else q & 0xFF)

    def _impl(self, x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> LegacyParams:
        d, levels, the_min = make_qkx3_quants(x, self.nmax, _impl_weights(x, qw, sigma2),
                                              f32(-0.9), f32(0.05), 36, False)
        return LegacyParams(d, -the_min, levels)

    def pack(self, codes: torch.Tensor, params: LegacyParams) -> torch.Tensor:
        q = codes.long()
        head = [_fp16_bytes(params.d), _fp16_bytes(params.m)]
        if self.nmax == 31:
            head.append(_pack_qh(q))
        return torch.cat([*head, _pack_nibbles(q)], dim=1)

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        q = _unpack_nibbles(blocks[:, -16:])
        if self.nmax == 31:
            q = q | _unpack_qh(blocks[:, 4:8])
        return _fp16_value(blocks[:, :2]) * q.float() + _fp16_value(blocks[:, 2:4])


@register_codec
class Q4_0Codec(_SymmetricCodec):
    """``GGML_TYPE_Q4_0``: ``quantize_row_q4_0_ref`` / ``quantize_row_q4_0_impl``."""

    name, type_id, type_size, nmax = "Q4_0", 2, 18, 8
    zero_point, code_max = 8, 15


@register_codec
class Q5_0Codec(_SymmetricCodec):
    """``GGML_TYPE_Q5_0``: ``quantize_row_q5_0_ref`` / ``quantize_row_q5_0_impl``."""

    name, type_id, type_size, nmax = "Q5_0", 6, 22, 16
    zero_point, code_max = 16, 31


@register_codec
class Q4_1Codec(_AffineCodec):
    """``GGML_TYPE_Q4_1``: ``quantize_row_q4_1_ref`` / ``quantize_row_q4_1_impl``."""

    name, type_id, type_size, nmax = "Q4_1", 3, 20, 15
    code_max = 15


@register_codec
class Q5_1Codec(_AffineCodec):
    """``GGML_TYPE_Q5_1``: ``quantize_row_q5_1_ref`` / ``quantize_row_q5_1_impl``."""

    name, type_id, type_size, nmax = "Q5_1", 7, 24, 31
    code_max = 31


__all__ = ["F32Codec", "F16Codec", "BF16Codec", "Q8_0Codec", "Q4_0Codec", "Q4_1Codec",
           "Q5_0Codec", "Q5_1Codec", "LegacyParams", "bf16_bits", "fp16_bits", "row_sigma2"]
