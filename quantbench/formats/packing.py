"""Bit packing named by layout, kept out of quantizers and formats (pure tensor functions)."""
from __future__ import annotations

import torch


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
