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
"""
from __future__ import annotations

import torch

from quantbench.quant.gguf.codec import BlockCodec, register_codec
from quantbench.quant.gguf.search import (f32, first_abs_max, first_max, first_min,
                                          make_qkx3_quants, make_qx_quants, seq_sum, sqrtf)

_CHUNK = 4096  # blocks per pass of a scale search (bounds its [blocks, candidates, 32] temps)


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


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """``qs[j] = q[j] | q[j + 16] << 4`` for 32 levels in ``[0, 16)`` (low nibble of each)."""
    return ((q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)).to(torch.uint8)


def _pack_qh(q: torch.Tensor) -> torch.Tensor:
    """The 32 fifth bits as the little-endian ``uint32_t qh``: ``[B, 4]`` bytes."""
    bits = ((q >> 4) & 1).reshape(-1, 4, 8)
    return (bits << torch.arange(8)).sum(dim=-1).to(torch.uint8)


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    q = qs.long()
    return torch.cat([q & 0x0F, q >> 4], dim=1)


def _unpack_qh(qh: torch.Tensor) -> torch.Tensor:
    return ((qh.long()[:, :, None] >> torch.arange(8)) & 1).reshape(-1, 32) << 4


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


# ------------------------------------------------------------------------------ Q8_0

@register_codec
class Q8_0Codec(BlockCodec):
    """``GGML_TYPE_Q8_0``: ``quantize_row_q8_0_ref`` (llama.cpp ignores the imatrix)."""

    name, type_id, block_size, type_size = "Q8_0", 8, 32, 34

    def quantize(self, x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        x = x.float()
        d = _div(x.abs().amax(dim=1), 127)
        inv = torch.where(d != 0, torch.div(torch.ones_like(d), d), torch.zeros_like(d))
        q = _c_int8(_roundf(x * inv[:, None]))
        return torch.cat([_fp16_bytes(d), (q & 0xFF).to(torch.uint8)], dim=1)

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        q = blocks[:, 2:].contiguous().view(torch.int8).float()
        return q * _fp16_value(blocks[:, :2])


# ----------------------------------------------------------------- Q4_0 / Q5_0 / Q4_1 / Q5_1

class _LegacyCodec(BlockCodec):
    """The 32-element legacy quants: ``ref`` without importance, ``_impl`` with it."""

    block_size = 32

    def quantize(self, x: torch.Tensor, importance: torch.Tensor | None = None,
                 sigma2: torch.Tensor | None = None) -> torch.Tensor:
        """``sigma2`` ``[n_blocks]``: each block's row ``Σx²/n_per_row`` (``_impl`` only);
        left out, every block counts as a row of its own."""
        x = x.float()
        if importance is None:
            return self._ref(x)
        if sigma2 is None:
            sigma2 = row_sigma2(x)
        out = [self._impl(x[i:i + _CHUNK], importance[i:i + _CHUNK].float(),
                          sigma2[i:i + _CHUNK]) for i in range(0, x.shape[0], _CHUNK)]
        return torch.cat(out) if out else torch.empty(0, self.type_size, dtype=torch.uint8)

    def quantize_rows(self, w: torch.Tensor, importance: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Rows ``[rows, ne0]`` as ``quantize_<type>`` does them, ``sigma2`` per row."""
        if importance is None:
            return super().quantize_rows(w)
        rows, cols = w.shape
        self.check_row(cols)
        w = w.float()
        sigma2 = row_sigma2(w).repeat_interleave(cols // self.block_size)
        imp = importance.float().reshape(1, cols).expand(rows, cols).reshape(-1, self.block_size)
        return self.quantize(w.reshape(-1, self.block_size), imp, sigma2).reshape(rows, -1)

    def _ref(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _impl(self, x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def row_sigma2(x: torch.Tensor) -> torch.Tensor:
    """``sum_x2 += x[j]*x[j]`` over a row in order, then ``sum_x2/n_per_row`` (the ``_impl``
    functions' ``sigma2``); ``x`` is ``[rows, n_per_row]``."""
    return seq_sum(x * x) / f32(x.shape[1])


def _impl_weights(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """``weight[j] = qw[j] * sqrtf(sigma2 + xb[j]*xb[j])``."""
    return qw * sqrtf(sigma2[:, None] + x * x)


class _SymmetricCodec(_LegacyCodec):
    """Q4_0 / Q5_0: ``d = max / -(nmax)`` from the element of largest magnitude."""

    nmax = 8

    def _ref(self, x: torch.Tensor) -> torch.Tensor:
        _, mx = first_abs_max(x)
        d = _div(mx, -self.nmax)
        inv = torch.where(d != 0, torch.div(torch.ones_like(d), d), torch.zeros_like(d))
        q = _c_int8(x * inv[:, None] + (self.nmax + 0.5))
        return self._pack(d, q.clamp(max=2 * self.nmax - 1) & 0xFF)

    def _impl(self, x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
        d, levels = make_qx_quants(x, self.nmax, 1, _impl_weights(x, qw, sigma2))
        return self._pack(d, levels)

    def _pack(self, d: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        if self.nmax == 8:
            return torch.cat([_fp16_bytes(d), _pack_nibbles(q)], dim=1)
        return torch.cat([_fp16_bytes(d), _pack_qh(q), _pack_nibbles(q)], dim=1)

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        q = _unpack_nibbles(blocks[:, -16:])
        if self.nmax == 16:
            q = q | _unpack_qh(blocks[:, 2:6])
        return _fp16_value(blocks[:, :2]) * (q - self.nmax).float()


class _AffineCodec(_LegacyCodec):
    """Q4_1 / Q5_1: ``d = (max - min) / nmax``, ``m = min``."""

    nmax = 15

    def _ref(self, x: torch.Tensor) -> torch.Tensor:
        mn, mx = first_min(x), first_max(x)
        d = _div(mx - mn, self.nmax)
        inv = torch.where(d != 0, torch.div(torch.ones_like(d), d), torch.zeros_like(d))
        q = _c_int8((x - mn[:, None]) * inv[:, None] + 0.5)
        if self.nmax == 15:        # Q4_1 clamps with MIN(15, ...); Q5_1 only casts to uint8
            q = q.clamp(max=15)
        return self._pack(d, mn, q & 0xFF)

    def _impl(self, x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
        d, levels, the_min = make_qkx3_quants(x, self.nmax, _impl_weights(x, qw, sigma2),
                                              f32(-0.9), f32(0.05), 36, False)
        return self._pack(d, -the_min, levels)

    def _pack(self, d: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        head = [_fp16_bytes(d), _fp16_bytes(m)]
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


@register_codec
class Q5_0Codec(_SymmetricCodec):
    """``GGML_TYPE_Q5_0``: ``quantize_row_q5_0_ref`` / ``quantize_row_q5_0_impl``."""

    name, type_id, type_size, nmax = "Q5_0", 6, 22, 16


@register_codec
class Q4_1Codec(_AffineCodec):
    """``GGML_TYPE_Q4_1``: ``quantize_row_q4_1_ref`` / ``quantize_row_q4_1_impl``."""

    name, type_id, type_size, nmax = "Q4_1", 3, 20, 15


@register_codec
class Q5_1Codec(_AffineCodec):
    """``GGML_TYPE_Q5_1``: ``quantize_row_q5_1_ref`` / ``quantize_row_q5_1_impl``."""

    name, type_id, type_size, nmax = "Q5_1", 7, 24, 31


__all__ = ["F32Codec", "F16Codec", "BF16Codec", "Q8_0Codec", "Q4_0Codec", "Q4_1Codec",
           "Q5_0Codec", "Q5_1Codec", "bf16_bits", "fp16_bits", "row_sigma2"]
