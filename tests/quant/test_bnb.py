"""NF4/FP4/LLM.int8 maths against bitsandbytes itself (a test extra; skipped without it)."""
from __future__ import annotations

import pytest
import torch

from quantbench.config import CodebookGridConfig
from quantbench.errors import ConfigError
from quantbench.quant import bnb

bnbf = pytest.importorskip("bitsandbytes.functional",
                           reason="bitsandbytes is not installed (pip install -e .[test])")

SHAPES = [(64, 96), (576, 576), (49, 77), (3, 5)]  # partial last blocks included


def weight(shape, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.05
    w[0, 0] = 0.9  # an outlier in the first block
    return w.to(dtype)


def test_tables_equal_bitsandbytes():
    for name in ("nf4", "fp4"):
        assert torch.equal(bnb.codebook(name), bnbf.get_4bit_type(name, device="cpu"))
    assert torch.equal(bnb.dynamic_map_signed(), bnbf.create_dynamic_map(signed=True))


def bnb_dequantize(packed, state, shape, block):
    """bitsandbytes' own dequantization, by its generic (reference) implementation and, where
    it is right, by the native CPU kernel ``dequantize_4bit`` dispatches to. bitsandbytes
    0.50's AVX512 CPU kernel mis-decodes rows whose length is not a multiple of the block
    (blocks that straddle rows): measured on (64, 96)/64 and (576, 576)/256, errors 3-4x the
    quantization error. There only the reference implementation is compared."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    ref = _dequantize_4bit_compute(packed.reshape(-1).view(torch.uint8), absmax,
                                   _get_4bit_code(state.quant_type, packed.device), block,
                                   shape, state.dtype)
    if shape[-1] % block == 0:
        assert torch.equal(ref, bnbf.dequantize_4bit(packed, state))
    return ref


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n]


@pytest.mark.parametrize("codebook", ["nf4", "fp4"])
@pytest.mark.parametrize("block", [32, 64, 256, 4096])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_codes_and_absmax_bit_exact(codebook, block, shape, dtype):
    w = weight(shape, dtype)
    grid = CodebookGridConfig(codebook, block)
    codes, absmax = bnb.quantize_4bit(w, grid)
    packed, state = bnbf.quantize_4bit(w, blocksize=block, quant_type=codebook)
    assert torch.equal(codes.reshape(-1), unpack(packed, w.numel()))
    assert torch.equal(absmax, state.absmax)
    ours = bnb.dequantize_4bit(codes, absmax, grid)
    assert torch.equal(ours.to(dtype), bnb_dequantize(packed, state, w.shape, block))


@pytest.mark.parametrize("codebook", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (64, 96)])
def test_double_quant_bit_exact(codebook, shape):
    w = weight(shape, seed=1)
    grid = CodebookGridConfig(codebook, 64, double_quant=True)
    codes, absmax = bnb.quantize_4bit(w, grid)
    q, nested, offset = bnb.quantize_absmax(absmax)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=codebook,
                                       compress_statistics=True)
    assert torch.equal(q, state.absmax)
    assert torch.equal(nested, state.state2.absmax)
    assert torch.equal(offset, state.offset)
    ours = bnb.dequantize_4bit(codes, bnb.dequantize_absmax(q, nested, offset), grid)
    assert torch.equal(ours.half(), bnb_dequantize(packed, state, w.shape, 64))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_int8_rows_equal_vectorwise_quant(shape, dtype):
    w = weight(shape, dtype)
    cb, scb = bnb.int8_rows(w)
    ref_cb, ref_scb, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
    assert torch.equal(cb, ref_cb) and torch.equal(scb, ref_scb)
    assert torch.equal(bnb.int8_dequantize(cb, scb), bnbf.int8_vectorwise_dequant(cb, scb))


@pytest.mark.parametrize("threshold", [0.0, 6.0, 1.5])
def test_mixed_matmul_equals_bitsandbytes(threshold):
    """Our LLM.int8 forward equals bitsandbytes' inference matmul (CPU) for fp16 and fp32."""
    import bitsandbytes as bnb_lib

    w = weight((96, 64), torch.float16, seed=3)
    cb, scb = bnb.int8_rows(w)
    g = torch.Generator().manual_seed(4)
    for dtype in (torch.float16, torch.float32):
        x = torch.randn(2, 7, 64, generator=g).to(dtype)
        x[..., 5] *= 10  # an outlier feature
        state = bnb_lib.MatmulLtState()
        state.CB, state.SCB, state.threshold, state.has_fp16_weights = cb, scb, threshold, False
        state.is_training = False
        ref = bnb_lib.matmul(x, cb, state=state, threshold=threshold)
        ours = bnb.int8_mixed_linear(x, cb, scb, threshold)
        assert ours.dtype == ref.dtype == dtype
        assert torch.equal(ours, ref), (dtype, (ours.float() - ref.float()).abs().max())


def test_outliers_change_the_result_and_decomposition_is_closer():
    w = weight((96, 64), torch.float32, seed=5)
    cb, scb = bnb.int8_rows(w)
    x = torch.randn(16, 64) * 0.5
    x[:, 3] = 20.0
    exact = x @ bnb.int8_dequantize(cb, scb).t()
    mixed = bnb.int8_mixed_linear(x, cb, scb, 6.0)
    plain = bnb.int8_mixed_linear(x, cb, scb, 0.0)
    assert bnb.outlier_columns(x, 6.0).tolist() == [3]
    assert (mixed - exact).abs().mean() < 0.5 * (plain - exact).abs().mean()


@pytest.mark.parametrize("block", [16, 48, 8192, True])
def test_block_sizes_not_allowed(block):
    with pytest.raises(ConfigError, match="block size"):
        CodebookGridConfig("nf4", block)
