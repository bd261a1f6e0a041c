"""bitsandbytes grids as pure tensor functions: NF4/FP4 blockwise codebooks (with optional
double quantization of the absmax values) and LLM.int8's row-wise int8 with its run-time
mixed-precision matmul.

Every step reproduces what bitsandbytes computes on the CPU (its pure-torch reference
``backends/default/ops.py`` and ``functional.py``, FORMATS.md §3), operation for operation, so
codes, absmax and nested statistics agree bit for bit (tests/quant/test_bnb.py checks this
against bitsandbytes itself when it is installed).
"""
from __future__ import annotations

from functools import lru_cache

from typing import TYPE_CHECKING

from quantbench.lazy import torch

if TYPE_CHECKING:
    from quantbench.quant.grids.codebook import CodebookGridConfig

NESTED_BLOCK_SIZE = 256   # double quantization: absmax values per nested block

# NF4: quantiles of N(0, 1) normalised to [-1, 1], sorted (index = bucket).
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
# FP4 (e2m1-like) in bit-pattern order, divided by its maximum 12.
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
           -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


@lru_cache(maxsize=None)
def codebook(name: str) -> torch.Tensor:
    """The 16 float32 values a 4-bit code indexes (stored as ``weight.quant_map``)."""
    data = torch.tensor(NF4 if name == "nf4" else FP4_RAW, dtype=torch.float32)
    return data.div_(data.abs().max())


@lru_cache(maxsize=None)
def _bounds(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between sorted table values, and the sorted → stored index map."""
    code = codebook(name)
    order = torch.argsort(code)
    return (code[order[:-1]] + code[order[1:]]) / 2, order


@lru_cache(maxsize=None)
def dynamic_map_signed() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map (256 float32 values, sorted) used to quantize
    the absmax values under double quantization (``nested_quant_map``)."""
    data: list[float] = []
    exponent_bits, non_sign_bits = 7, 7
    for i in range(exponent_bits):
        items = int(2 ** (i + non_sign_bits - exponent_bits) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _block_absmax_scaled(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax of ``flat`` (float32) and the values scaled into [-1, 1]: full blocks
    multiply by the reciprocal, a final partial block divides, as bitsandbytes does."""
    n = flat.numel()
    rem = n % block
    full = n - rem
    blocks = flat[:full].reshape(-1, block)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    return absmax, scaled


def quantize_4bit(w: torch.Tensor, grid: "CodebookGridConfig"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8 ``[out, in]``, stored table index 0..15) and per-block absmax (float32)."""
    bounds, order = _bounds(grid.codebook)
    absmax, scaled = _block_absmax_scaled(w.reshape(-1).float(), grid.block_size)
    q = torch.bucketize(scaled, bounds, out_int32=True)
    if grid.codebook != "nf4":
        q = order[q]
    return q.to(torch.uint8).reshape(w.shape), absmax


def quantize_absmax(absmax: torch.Tensor, block: int = NESTED_BLOCK_SIZE
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: ``(qabsmax uint8, nested_absmax float32, offset float32 scalar)``
    with ``absmax ≈ map[qabsmax]·nested_absmax[i // 256] + offset``."""
    offset = absmax.mean()
    q, nested = _quantize_blockwise_lut((absmax - offset).reshape(-1).float(), block)
    return q, nested, offset


@lru_cache(maxsize=None)
def _dynamic_lut() -> torch.Tensor:
    """bitsandbytes' CPU kernel (``csrc/cpu_ops.cpp`` ``build_quantize_lut``): [-1, 1] cut into
    65536 bins, each bin's value mapped to the first code whose upper midpoint reaches it."""
    code = dynamic_map_signed()
    mid = (code[:-1] + code[1:]) * 0.5
    val = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    return torch.searchsorted(mid, val).to(torch.uint8)


def _quantize_blockwise_lut(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization onto the dynamic map as the bitsandbytes CPU kernel does it
    (multiply by the block's reciprocal absmax, then the 65536-bin lookup table, which is the
    nearest code except within ~1e-5 of a midpoint); a zero block gets code 0."""
    n = flat.numel()
    n_blocks = -(-n // block)
    blocks = torch.zeros(n_blocks * block)
    blocks[:n] = flat
    blocks = blocks.view(n_blocks, block)
    absmax = blocks.abs().max(dim=1)[0]
    scaled = (blocks * (1.0 / absmax).view(-1, 1)).clamp(-1, 1)
    index = ((scaled + 1.0) * 0.5 * 65535.0 + 0.5).long()
    q = torch.where((absmax == 0).view(-1, 1), 0, _dynamic_lut()[index])
    return q.reshape(-1)[:n].to(torch.uint8), absmax


def dequantize_absmax(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor,
                      block: int = NESTED_BLOCK_SIZE) -> torch.Tensor:
    values = dynamic_map_signed()[qabsmax.reshape(-1).long()]
    return _times_blocks(values, nested_absmax, block) + offset


def _times_blocks(values: torch.Tensor, absmax: torch.Tensor, block: int) -> torch.Tensor:
    """``values[i] · absmax[i // block]`` over a flat float32 vector (partial last block)."""
    n = values.numel()
    rem = n % block
    full = n - rem
    out = torch.empty(n, dtype=torch.float32)
    out[:full] = (values[:full].view(-1, block) * absmax[: full // block].view(-1, 1)).reshape(-1)
    if rem:
        out[full:] = values[full:] * absmax[full // block]
    return out


def dequantize_4bit(codes: torch.Tensor, absmax: torch.Tensor, grid: "CodebookGridConfig"
                    ) -> torch.Tensor:
    """float32 ``table[code] · absmax[block]`` in the weight's shape."""
    values = codebook(grid.codebook)[codes.reshape(-1).long()]
    return _times_blocks(values, absmax.float().reshape(-1), grid.block_size).reshape(codes.shape)


# ---- LLM.int8 ------------------------------------------------------------------------------

def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' vector-wise quantization of a weight (computed from its float16 copy):
    ``SCB = max|w|`` per row (float32), ``CB = round(w · (127 / SCB))`` (int8)."""
    w16 = w.to(torch.float16)
    scb = torch.max(w16.abs(), dim=1).values.float()
    cb = torch.round(w16 * (127.0 / scb.unsqueeze(-1))).to(torch.int8)
    return cb, scb


def int8_dequantize(cb: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """``CB · SCB / 127`` in float32, as bitsandbytes and transformers dequantize."""
    return cb * scb.view(-1, 1) * 7.874015718698502e-3


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Input columns (features) where any token's float16 magnitude reaches ``threshold``."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.float16)
    return torch.argwhere((flat.abs() >= threshold).any(dim=0)).view(-1)


def int8_mixed_linear(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, threshold: float,
                      bias: torch.Tensor | None = None,
                      cb_float: torch.Tensor | None = None) -> torch.Tensor:
    """LLM.int8's forward as bitsandbytes runs it for inference: activations (float16 copy)
    quantized per token row to int8 with outlier entries (``|x| ≥ threshold``) zeroed; the int8
    product rescaled by ``rowstat·SCB/127²``; then the outlier columns added back in the input
    dtype against their dequantized weight columns. ``threshold <= 0``: no decomposition."""
    shape = x.shape
    a = x.reshape(-1, shape[-1])
    a16 = a.to(torch.float16)
    cols = None
    if threshold > 0.0:
        outliers = a16.abs() >= threshold
        cols = torch.argwhere(outliers.any(dim=0)).view(-1)
        a16 = a16.masked_fill(outliers, 0)
    row_stats = torch.max(a16.abs(), dim=1).values.float()
    ca = torch.round(a16 * (127.0 / row_stats.unsqueeze(-1))).to(torch.int8)
    if cols is not None and a.shape[0] > 1:
        ca[:, cols] = 0
    cb_float = cb.float() if cb_float is None else cb_float  # exact: int8 values in float32
    acc = torch.matmul(ca.float(), cb_float.t()).to(torch.int32)
    out = acc * (row_stats.view(-1, 1) * scb.view(1, -1)) * 6.200124e-05
    if bias is not None:
        out = out + bias
    out = out.to(x.dtype)
    if cols is not None and cols.numel():
        sub_w = int8_dequantize(cb[:, cols].contiguous(), scb).to(x.dtype).t()
        out = out.addmm(a[:, cols].contiguous(), sub_w)
    return out.reshape(*shape[:-1], cb.shape[0])
