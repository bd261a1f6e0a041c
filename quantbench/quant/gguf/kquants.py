"""The k-quant types Q4_K, Q5_K, Q6_K (this file) and Q2_K, Q3_K (``kquants_low``).

Super-blocks of ``QK_K = 256`` elements, byte for byte what llama.cpp's ``ggml_quantize_chunk``
writes (``ggml-quants.c``): ``quantize_row_<type>_ref`` without an importance vector,
``quantize_row_<type>_impl`` with one. Every k-quant is split in three steps, so that a later
method (GPTQ on GGUF) can fit the block parameters once and then round columns itself:

* :meth:`KQuantCodec.fit` ``(x, importance) -> KParams``: the searches that choose the
  sub-block scales/mins, quantize them (6/4/8 bits) and the super-block ``d``/``dmin`` (fp16);
* :meth:`KQuantCodec.codes_for` ``(x, params) -> codes``: the final
  ``nearest_int((x + dmin·m)/(d·sc))`` with its clamp (llama.cpp keeps the search's levels in
  a sub-block whose ``d·sc`` is 0: :attr:`KParams.fallback`);
* :meth:`KQuantCodec.pack` ``(codes, params) -> bytes`` (and :meth:`KQuantCodec.unpack`).

Codes are the unsigned levels the block stores (Q2_K 0..3, Q3_K 0..7, Q4_K 0..15, Q5_K 0..31,
Q6_K 0..63); an element decodes to ``scale·(code − zero_point) − offset`` with
:meth:`KQuantCodec.element_grid`'s per-element ``scale``/``offset`` (float32, computed as the
C dequantizer does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from quantbench.lazy import torch
from quantbench.quant.gguf.codec import BlockCodec, register_codec
from quantbench.quant.gguf.search import (GROUP_MAX_EPS, first_abs_max, make_qkx2_quants,
                                          make_qkx3_quants, make_qp_quants, make_qx_quants,
                                          nearest_int, rdiv, seq_sum, sqrtf)

QK_K = 256


@dataclass
class KParams:
    """One k-quant's per-super-block parameters, as the block stores them (``N`` blocks)."""

    d: torch.Tensor         # [N] float32: super-block scale, an fp16 value
    dmin: torch.Tensor      # [N] float32: super-block min scale, an fp16 value (0 if none)
    scales: torch.Tensor    # [N, n_sub] int64: quantized sub-block scales, as stored
    mins: torch.Tensor      # [N, n_sub] int64: quantized sub-block mins (0 if none)
    fallback: torch.Tensor  # [N, 256] int64: codes kept where a sub-block's d·sc is 0


# ------------------------------------------------------------------------------ shared helpers

def fp16_round(v: torch.Tensor) -> torch.Tensor:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))``: round to nearest even, back to float32."""
    return v.float().half().float()


def fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """``[N]`` fp16-representable float32 → ``[N, 2]`` uint8, little endian."""
    return v.float().half().contiguous().view(torch.uint8).reshape(-1, 2)


def fp16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """``[N, 2]`` uint8 → ``[N]`` float32."""
    return b.contiguous().view(torch.float16).float().reshape(-1)


def positive_max(v: torch.Tensor) -> torch.Tensor:
    """``m = 0; if (v[j] > m) m = v[j]`` over the last dim (``+0`` when nothing is > 0)."""
    m = v.amax(dim=-1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def row_sigma2(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``sumx2 = Σ x²`` over the 256 values in C order, then ``factor·sumx2/QK_K``; ``[N]``."""
    s = seq_sum(x * x)
    return (s * factor if factor != 1 else s) / QK_K


def imatrix_weights(x: torch.Tensor, importance: torch.Tensor, sigma2: torch.Tensor
                    ) -> torch.Tensor:
    """``qw[l] * sqrtf(sigma2 + x[l]*x[l])`` for every element; ``[N, 256]``."""
    return importance.float() * sqrtf(sigma2[:, None] + x * x)


def pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K ``scales[12]`` from 8 scales and 8 mins, bit for bit as the C loop stores
    them into ``uint8_t`` (values above 63 spill as they do there); int64 ``[N, 12]``."""
    out = torch.cat([ls[:, :4], lm[:, :4], (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], 1)
    out[:, :4] |= (ls[:, 4:] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    return out & 0xFF


def unpack_scale_min_k4(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``get_scale_min_k4`` for j = 0..7 over ``[N, 12]`` bytes → ``(sc, m)``, ``[N, 8]``."""
    q = q.long()
    sc = torch.cat([q[:, :4] & 63, (q[:, 8:] & 0xF) | ((q[:, :4] >> 6) << 4)], 1)
    m = torch.cat([q[:, 4:8] & 63, (q[:, 8:] >> 4) | ((q[:, 4:8] >> 6) << 4)], 1)
    return sc, m


def c_int8(v: torch.Tensor) -> torch.Tensor:
    """An int stored into ``int8_t`` (two's complement wrap); int64."""
    return ((v.long() + 128) & 0xFF) - 128


# --------------------------------------------------------------------------------- base class

class KQuantCodec(BlockCodec):
    """A k-quant as fit / codes_for / pack. Subclasses set the layout attributes and
    implement :meth:`fit`, :meth:`sub_grid`, :meth:`pack` and :meth:`unpack`."""

    block_size = QK_K
    sub_size: int = 32      # elements per sub-block
    qmax: int = 15          # largest code
    zero_point: int = 0     # code of the value 0 in a symmetric type
    has_min: bool = True    # x ≈ d·sc·q − dmin·m (else d·sc·(q − zero_point))

    @property
    def n_sub(self) -> int:
        return QK_K // self.sub_size

    def fit(self, x: torch.Tensor, importance: torch.Tensor | None = None) -> KParams:
        raise NotImplementedError

    def sub_grid(self, params: KParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sub-block float32 ``(d·sc, dmin·m)`` as the C requantize/dequantize compute
        them; ``[N, n_sub]`` each."""
        raise NotImplementedError

    def pack(self, codes: torch.Tensor, params: KParams) -> torch.Tensor:
        raise NotImplementedError

    def unpack(self, blocks: torch.Tensor) -> tuple[torch.Tensor, KParams]:
        """``[N, type_size]`` uint8 → ``(codes [N, 256], params)``."""
        raise NotImplementedError

    def element_grid(self, params: KParams) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, offset)`` ``[N, 256]``: an element decodes to
        ``scale·(code − zero_point) − offset``."""
        scale, offset = self.sub_grid(params)
        return (scale.repeat_interleave(self.sub_size, dim=1),
                offset.repeat_interleave(self.sub_size, dim=1))

    def codes_for(self, x: torch.Tensor, params: KParams) -> torch.Tensor:
        """The C requantize step over whole blocks: codes ``[N, 256]`` for ``x`` on the grid
        of ``params`` (see :meth:`round_to_grid`)."""
        scale, offset = self.element_grid(params)
        return self.round_to_grid(x, scale, offset, params.fallback)

    gptq_capable: ClassVar[bool] = True

    def round_to_grid(self, x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                      fallback: torch.Tensor) -> torch.Tensor:
        """Elementwise (any matching shapes, e.g. one column of :meth:`element_grid`):
        ``nearest_int((x + offset)/scale)`` clamped to ``[0, qmax]`` (symmetric types:
        ``nearest_int(x/scale) + zero_point``), and ``fallback`` where ``scale == 0``, which is
        what llama.cpp keeps there (the search's levels)."""
        num = x.float() + offset if self.has_min else x.float()
        dead = scale == 0
        q = nearest_int(num / torch.where(dead, torch.ones_like(scale), scale))
        q = q.clamp(-self.zero_point, self.qmax - self.zero_point) + self.zero_point
        return torch.where(dead, fallback, q)

    def dequantize_codes(self, codes: torch.Tensor, params: KParams) -> torch.Tensor:
        """``dequantize_row_<type>`` on codes and parameters; float32 ``[N, 256]``."""
        scale, offset = self.element_grid(params)
        out = scale * (codes - self.zero_point).float()
        return out - offset if self.has_min else out

    def quantize(self, x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        x = x.float().reshape(-1, QK_K)
        imp = None if importance is None else importance.float().reshape(-1, QK_K)
        if imp is not None and imp.shape != x.shape:
            raise ValueError(f"{self.name}: importance {tuple(importance.shape)} does not "
                             f"match the blocks {tuple(x.shape)}")
        out = torch.empty(x.shape[0], self.type_size, dtype=torch.uint8)
        step = max(1, self.chunk_elements // QK_K)    # bounds the searches' temporaries
        for s in range(0, x.shape[0], step):
            xc = x[s:s + step]
            params = self.fit(xc, None if imp is None else imp[s:s + step])
            out[s:s + step] = self.pack(self.codes_for(xc, params), params)
        return out

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        codes, params = self.unpack(blocks.reshape(-1, self.type_size))
        return self.dequantize_codes(codes, params)


# ------------------------------------------------------------------------------ Q4_K and Q5_K

class _K45(KQuantCodec):
    """Q4_K / Q5_K: 8 sub-blocks of 32, 6-bit scales and mins, ``x = d·sc·q − dmin·m``."""

    sub_size = 32
    ref_search: tuple[float, float, int] = (-1.0, 0.1, 20)   # rmin, rdelta, nstep

    def fit(self, x: torch.Tensor, importance: torch.Tensor | None = None) -> KParams:
        x = x.float()
        n = x.shape[0]
        xs = x.reshape(-1, 32)
        if importance is None:           # quantize_row_q{4,5}_K_ref
            av_x = sqrtf(seq_sum(xs * xs) / 32)
            rmin, rdelta, nstep = self.ref_search
            scales, levels, mins = make_qkx2_quants(xs, self.qmax, av_x[:, None] + xs.abs(),
                                                    rmin, rdelta, nstep, False)
            ls, d = self._max_scaled(scales.reshape(n, 8))
            lm, dmin = self._max_scaled(mins.reshape(n, 8))
        else:                            # quantize_row_q{4,5}_K_impl
            w = imatrix_weights(x, importance, row_sigma2(x, 2)).reshape(-1, 32)
            sw = seq_sum(w).reshape(n, 8)
            scales, levels, mins = make_qkx3_quants(xs, self.qmax, w, -0.9, 0.05, 36, False)
            d, ls = make_qp_quants(scales.reshape(n, 8), 63, sw)
            dmin, lm = make_qp_quants(mins.reshape(n, 8), 63, sw)
            ls, lm = self._clamp_impl(ls), self._clamp_impl(lm)
            d, dmin = fp16_round(d), fp16_round(dmin)
        return KParams(d, dmin, ls, lm, levels.reshape(n, QK_K))

    @staticmethod
    def _max_scaled(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ref path's 6-bit quantization against the largest value: ``(l, fp16(max/63))``."""
        vmax = positive_max(v)
        inv = torch.where(vmax > 0, rdiv(63, torch.where(vmax > 0, vmax, 1.0)), 0.0)
        levels = (nearest_int(inv[:, None] * v) & 0xFF).clamp(max=63)
        return levels, fp16_round(vmax / 63.0)

    def _clamp_impl(self, levels: torch.Tensor) -> torch.Tensor:
        return levels

    def sub_grid(self, params: KParams) -> tuple[torch.Tensor, torch.Tensor]:
        sc, m = unpack_scale_min_k4(pack_scale_min_k4(params.scales, params.mins))
        return params.d[:, None] * sc.float(), params.dmin[:, None] * m.float()

    def _head(self, params: KParams) -> torch.Tensor:
        scales = pack_scale_min_k4(params.scales, params.mins).to(torch.uint8)
        return torch.cat([fp16_bytes(params.d), fp16_bytes(params.dmin), scales], 1)

    def _unpack_head(self, blocks: torch.Tensor, codes: torch.Tensor) -> KParams:
        sc, m = unpack_scale_min_k4(blocks[:, 4:16])
        return KParams(fp16_from_bytes(blocks[:, 0:2]), fp16_from_bytes(blocks[:, 2:4]), sc, m,
                       codes)

    @staticmethod
    def _nibbles(codes: torch.Tensor) -> torch.Tensor:
        """``q[32c + l] = L[64c + l] | L[64c + 32 + l] << 4`` (low 4 bits of each code)."""
        c = (codes.long() & 0xF).reshape(-1, 4, 2, 32)
        return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(-1, 128)

    @staticmethod
    def _from_nibbles(qs: torch.Tensor) -> torch.Tensor:
        q = qs.long().reshape(-1, 4, 1, 32)
        return torch.cat([q & 0xF, q >> 4], 2).reshape(-1, QK_K)


@register_codec
class Q4K(_K45):
    name = "Q4_K"
    type_id = 12
    type_size = 144
    scale_offsets = (0, 2)         # d, dmin
    qmax = 15
    ref_search = (-1.0, 0.1, 20)

    def pack(self, codes: torch.Tensor, params: KParams) -> torch.Tensor:
        return torch.cat([self._head(params), self._nibbles(codes).to(torch.uint8)], 1)

    def unpack(self, blocks: torch.Tensor) -> tuple[torch.Tensor, KParams]:
        codes = self._from_nibbles(blocks[:, 16:144])
        return codes, self._unpack_head(blocks, codes)


@register_codec
class Q5K(_K45):
    name = "Q5_K"
    type_id = 13
    type_size = 176
    scale_offsets = (0, 2)         # d, dmin
    qmax = 31
    ref_search = (-0.5, 0.1, 15)

    def _clamp_impl(self, levels: torch.Tensor) -> torch.Tensor:
        return levels.clamp(max=63)      # the impl's ``ls = MIN(63, ls)``

    def pack(self, codes: torch.Tensor, params: KParams) -> torch.Tensor:
        high = (codes.long() >> 4).reshape(-1, 8, 32)         # bit 4 of sub-block k → qh bit k
        qh = sum(high[:, k] << k for k in range(8))
        return torch.cat([self._head(params), qh.to(torch.uint8),
                          self._nibbles(codes).to(torch.uint8)], 1)

    def unpack(self, blocks: torch.Tensor) -> tuple[torch.Tensor, KParams]:
        qh = blocks[:, 16:48].long()
        high = torch.stack([(qh >> k) & 1 for k in range(8)], 1).reshape(-1, QK_K)
        codes = self._from_nibbles(blocks[:, 48:176]) | (high << 4)
        return codes, self._unpack_head(blocks, codes)


# ---------------------------------------------------------------------------------------- Q6_K

@register_codec
class Q6K(KQuantCodec):
    """16 sub-blocks of 16, int8 scales, ``x = d·sc·(q − 32)``."""

    name = "Q6_K"
    type_id = 14
    type_size = 210
    scale_offsets = (208,)         # d
    sub_size = 16
    qmax = 63
    zero_point = 32
    has_min = False

    def fit(self, x: torch.Tensor, importance: torch.Tensor | None = None) -> KParams:
        x = x.float()
        n = x.shape[0]
        qw = None if importance is None else importance.float().reshape(-1, 16)
        scales, levels = make_qx_quants(x.reshape(-1, 16), 32, 1, qw)
        scales = scales.reshape(n, 16)
        amax, max_scale = first_abs_max(scales)
        dead = amax < GROUP_MAX_EPS      # the whole block is written as zeros
        iscale = rdiv(-128, torch.where(dead, torch.ones_like(max_scale), max_scale))
        d = fp16_round(torch.div(torch.ones_like(iscale), iscale))
        sc = c_int8(nearest_int(iscale[:, None] * scales).clamp(max=127))
        zero = torch.zeros_like(d)
        return KParams(torch.where(dead, zero, d), zero,
                       torch.where(dead[:, None], torch.zeros_like(sc), sc),
                       torch.zeros_like(sc),
                       torch.where(dead[:, None], 0, levels.reshape(n, QK_K)))

    def sub_grid(self, params: KParams) -> tuple[torch.Tensor, torch.Tensor]:
        scale = params.d[:, None] * params.scales.float()
        return scale, torch.zeros_like(scale)

    def pack(self, codes: torch.Tensor, params: KParams) -> torch.Tensor:
        c = codes.long().reshape(-1, 2, 4, 32)                # [half, quarter, l]
        lo, hi = c & 0xF, c >> 4
        ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], 2)
        qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
        return torch.cat([ql.reshape(-1, 128).to(torch.uint8), qh.reshape(-1, 64).to(torch.uint8),
                          (params.scales & 0xFF).to(torch.uint8), fp16_bytes(params.d)], 1)

    def unpack(self, blocks: torch.Tensor) -> tuple[torch.Tensor, KParams]:
        ql = blocks[:, :128].long().reshape(-1, 2, 2, 32)     # [half, first/second 32, l]
        qh = blocks[:, 128:192].long().reshape(-1, 2, 1, 32)
        lo = torch.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4,
                          ql[:, :, 1] >> 4], 2)
        hi = (qh >> torch.tensor([0, 2, 4, 6]).reshape(1, 1, 4, 1)) & 3
        codes = (lo | (hi << 4)).reshape(-1, QK_K)
        sc = c_int8(blocks[:, 192:208].long())
        d = fp16_from_bytes(blocks[:, 208:210])
        return codes, KParams(d, torch.zeros_like(d), sc, torch.zeros_like(sc), codes)
