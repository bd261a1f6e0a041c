"""Bit packing named by layout, kept out of quantizers and formats (pure tensor functions)."""
from __future__ import annotations

from quantbench.lazy import torch


def pack_bits_lsb_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, n]`` codes → int32 ``[rows, ceil(n*bits/32)]``: a little-endian bitstream along
    dim 1, element ``i`` at global bit ``i*bits`` (elements may straddle words)."""
    rows, n = codes.shape
    n_words = -(-n * bits // 32)
    pos = torch.arange(n, dtype=torch.int64) * bits
    word, shift = pos // 32, pos % 32
    values = codes.to(torch.int64) & ((1 << bits) - 1)
    out = torch.zeros(rows, n_words + 1, dtype=torch.int64)
    out.scatter_add_(1, word.expand(rows, n), (values << shift) & 0xFFFFFFFF)
    spill = (shift + bits > 32)
    if spill.any():
        hi = values[:, spill] >> (32 - shift[spill])
        out.scatter_add_(1, (word[spill] + 1).expand(rows, -1), hi)
    out = out[:, :n_words]
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)


def unpack_bits_lsb_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits_lsb_rows``: int32 words → uint8 ``[rows, n]``."""
    if 32 % bits == 0:  # no element straddles two words: shift each word by every slot
        per = 32 // bits
        shifts = torch.arange(per, dtype=torch.int32) * bits
        # an arithmetic shift fills the top with sign bits; the mask keeps the slot's own
        value = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return value.reshape(packed.shape[0], -1)[:, :n].to(torch.uint8)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros(words.shape[0], 1, dtype=torch.int64)], dim=1)
    pos = torch.arange(n, dtype=torch.int64) * bits
    word, shift = pos // 32, pos % 32
    lo = words[:, word] >> shift
    hi = words[:, word + 1] << (32 - shift)
    value = torch.where(shift + bits > 32, lo | hi, lo) & ((1 << bits) - 1)
    return value.to(torch.uint8)


def pack_bits_lsb_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[n, cols]`` → int32 ``[ceil(n*bits/32), cols]``: the same bitstream along dim 0."""
    return pack_bits_lsb_rows(codes.t(), bits).t().contiguous()


def unpack_bits_lsb_cols(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return unpack_bits_lsb_rows(packed.t(), bits, n).t().contiguous()


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column 8*w + AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j of a word sits at nibble REVERSE[j]


def pack_awq_cols(values: torch.Tensor) -> torch.Tensor:
    """4-bit ``[rows, cols]`` → int32 ``[rows, cols/8]`` in AWQ GEMM's interleaved nibble order
    (FORMATS.md §2.2); ``cols`` must be a multiple of 8."""
    rows, cols = values.shape
    order = torch.tensor(AWQ_ORDER)
    interleaved = values.reshape(rows, cols // 8, 8)[:, :, order].reshape(rows, cols)
    return pack_bits_lsb_rows(interleaved, 4)


def unpack_awq_cols(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_awq_cols``: int32 ``[rows, w]`` → uint8 ``[rows, 8*w]``."""
    rows, words = packed.shape
    nibbles = unpack_bits_lsb_rows(packed, 4, 8 * words).reshape(rows, words, 8)
    return nibbles[:, :, torch.tensor(AWQ_REVERSE_ORDER)].reshape(rows, 8 * words).contiguous()


def pack_nibbles_hi_first(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (any shape, flattened row-major) → uint8 ``[ceil(n/2), 1]`` with the even
    element in the high nibble (bitsandbytes' 4-bit layout); an odd count is padded with 0."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return ((flat[0::2] << 4) | flat[1::2]).unsqueeze(1)


def unpack_nibbles_hi_first(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack_nibbles_hi_first``: the first ``n`` codes, flat uint8."""
    p = packed.reshape(-1).to(torch.uint8)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n]
