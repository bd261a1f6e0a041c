"""The low-bit k-quants Q2_K and Q3_K (the fit / codes_for / pack split is in ``kquants``).

Both cut the 256-element super-block into 16 sub-blocks of 16 and store the 2 low bits of each
code in ``qs[64]``: byte ``32h + l`` holds elements ``128h + 32s + l`` at bits ``2s``.
"""
from __future__ import annotations

from quantbench.lazy import torch
from quantbench.quant.gguf.codec import register_codec
from quantbench.quant.gguf.kquants import (QK_K, KParams, KQuantCodec, c_int8, fp16_bytes,
                                           fp16_from_bytes, fp16_round, imatrix_weights,
                                           positive_max, row_sigma2)
from quantbench.quant.gguf.search import (first_abs_max, make_q3_quants, make_qkx2_quants,
                                          make_qkx3_quants, make_qp_quants, make_qx_quants,
                                          nearest_int, rdiv, seq_sum)



def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """``qs[j/4 + l] = L[j+l] | L[j+l+32] << 2 | L[j+l+64] << 4 | L[j+l+96] << 6`` (low two
    bits of each code); uint8 ``[N, 64]``."""
    c = (codes.long() & 3).reshape(-1, 2, 4, 32)
    qs = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)
    return qs.reshape(-1, 64).to(torch.uint8)


def unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    shifts = torch.tensor([0, 2, 4, 6]).reshape(1, 1, 4, 1)
    return ((qs.long().reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, QK_K)


# ---------------------------------------------------------------------------------------- Q2_K

@register_codec
class Q2K(KQuantCodec):
    """4-bit scale and min per sub-block (one byte: scale low, min high),
    ``x = d·sc·q − dmin·m``. Bytes: ``scales[16], qs[64], d, dmin``."""

    name = "Q2_K"
    scale_offsets = (80, 82)       # d, dmin
    type_id = 10
    type_size = 84
    sub_size = 16
    qmax = 3

    def fit(self, x: torch.Tensor, importance: torch.Tensor | None = None) -> KParams:
        x = x.float()
        n = x.shape[0]
        xs = x.reshape(-1, 16)
        if importance is None:           # quantize_row_q2_K_ref
            scales, levels, mins = make_qkx2_quants(xs, 3, xs.abs(), -0.5, 0.1, 15, True)
            ls, d = self._max_scaled(scales.reshape(n, 16))
            lm, dmin = self._max_scaled(mins.reshape(n, 16))
        else:                            # quantize_row_q2_K_impl
            w = imatrix_weights(x, importance, row_sigma2(x, 1)).reshape(-1, 16)
            sw = seq_sum(w).reshape(n, 16)
            scales, levels, mins = make_qkx3_quants(xs, 3, w, -0.9, 0.05, 36, False)
            d, ls = make_qp_quants(scales.reshape(n, 16), 15, sw)
            dmin, lm = make_qp_quants(mins.reshape(n, 16), 15, sw)
            d, dmin = fp16_round(d), fp16_round(dmin)
        byte = (ls | (lm << 4)) & 0xFF   # the uint8_t scales[j], as C stores it
        return KParams(d, dmin, byte & 0xF, byte >> 4, levels.reshape(n, QK_K))

    @staticmethod
    def _max_scaled(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``if (max > 0) { l = nearest_int(15/max · v); d = fp16(max/15) } else 0``."""
        vmax = positive_max(v)
        ok = vmax > 0
        iscale = rdiv(15, torch.where(ok, vmax, torch.ones_like(vmax)))
        levels = torch.where(ok[:, None], nearest_int(iscale[:, None] * v), 0)
        return levels, torch.where(ok, fp16_round(vmax / 15.0), torch.zeros_like(vmax))

    def sub_grid(self, params: KParams) -> tuple[torch.Tensor, torch.Tensor]:
        return (params.d[:, None] * params.scales.float(),
                params.dmin[:, None] * params.mins.float())

    def pack(self, codes: torch.Tensor, params: KParams) -> torch.Tensor:
        scales = ((params.scales & 0xF) | ((params.mins & 0xF) << 4)).to(torch.uint8)
        return torch.cat([scales, pack_2bit(codes), fp16_bytes(params.d),
                          fp16_bytes(params.dmin)], 1)

    def unpack(self, blocks: torch.Tensor) -> tuple[torch.Tensor, KParams]:
        scales = blocks[:, :16].long()
        codes = unpack_2bit(blocks[:, 16:80])
        return codes, KParams(fp16_from_bytes(blocks[:, 80:82]),
                              fp16_from_bytes(blocks[:, 82:84]), scales & 0xF, scales >> 4,
                              codes)


# ---------------------------------------------------------------------------------------- Q3_K

@register_codec
class Q3K(KQuantCodec):
    """6-bit signed scales (stored biased by 32) per sub-block, ``x = d·(sc−32)·(q − 4)``.
    Bytes: ``hmask[32], qs[64], scales[12], d``; bit 2 of the code of element ``32b + m`` is
    bit ``b`` of ``hmask[m]``."""

    name = "Q3_K"
    scale_offsets = (108,)         # d
    type_id = 11
    type_size = 110
    sub_size = 16
    qmax = 7
    zero_point = 4
    has_min = False

    def fit(self, x: torch.Tensor, importance: torch.Tensor | None = None) -> KParams:
        x = x.float()
        n = x.shape[0]
        xs = x.reshape(-1, 16)
        if importance is None:           # quantize_row_q3_K_ref
            scales, levels = make_q3_quants(xs, 4, True)
            sc6, d = self._quantize_scales(scales.reshape(n, 16))
        else:                            # quantize_row_q3_K_impl
            w = imatrix_weights(x, importance, row_sigma2(x, 2)).reshape(-1, 16)
            sw = seq_sum(w).reshape(n, 16)
            scales, levels = make_qx_quants(xs, 4, 1, w)
            d, sc6 = make_qx_quants(scales.reshape(n, 16), 32, 1, sw)
            d = fp16_round(d)
        zero = torch.zeros_like(d)
        return KParams(d, zero, sc6, torch.zeros_like(sc6), levels.reshape(n, QK_K))

    @staticmethod
    def _quantize_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ref path: ``iscale = -32/max_scale``, ``l = clamp((int8_t)nearest_int(iscale·s),
        -32, 31) + 32``, ``d = fp16(1/iscale)``; all zero when ``max_scale == 0``."""
        _, max_scale = first_abs_max(scales)
        ok = max_scale != 0
        iscale = rdiv(-32, torch.where(ok, max_scale, torch.ones_like(max_scale)))
        sc6 = c_int8(nearest_int(iscale[:, None] * scales)).clamp(-32, 31) + 32
        d = fp16_round(torch.div(torch.ones_like(iscale), iscale))
        return (torch.where(ok[:, None], sc6, 0),
                torch.where(ok, d, torch.zeros_like(d)))

    def sub_grid(self, params: KParams) -> tuple[torch.Tensor, torch.Tensor]:
        scale = params.d[:, None] * (params.scales - 32).float()
        return scale, torch.zeros_like(scale)

    def pack(self, codes: torch.Tensor, params: KParams) -> torch.Tensor:
        c = codes.long().reshape(-1, 8, 32)
        hmask = sum((c[:, b] > 3).long() << b for b in range(8))
        s = params.scales.long()
        low = (s[:, :8] & 0xF) | ((s[:, 8:] & 0xF) << 4)
        high = sum((s[:, 4 * g:4 * g + 4] >> 4) << (2 * g) for g in range(4))
        return torch.cat([hmask.to(torch.uint8), pack_2bit(codes),
                          torch.cat([low, high], 1).to(torch.uint8), fp16_bytes(params.d)], 1)

    def unpack(self, blocks: torch.Tensor) -> tuple[torch.Tensor, KParams]:
        hm = blocks[:, :32].long()
        hbit = torch.stack([(hm >> b) & 1 for b in range(8)], 1).reshape(-1, QK_K)
        codes = unpack_2bit(blocks[:, 32:96]) | (hbit << 2)
        b = blocks[:, 96:108].long()
        low = torch.cat([b[:, :8] & 0xF, b[:, :8] >> 4], 1)
        high = torch.cat([(b[:, 8:12] >> (2 * g)) & 3 for g in range(4)], 1)
        d = fp16_from_bytes(blocks[:, 108:110])
        sc6 = low | (high << 4)
        return codes, KParams(d, torch.zeros_like(d), sc6, torch.zeros_like(sc6), codes)
