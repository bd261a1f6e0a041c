"""The float and legacy GGUF codecs against llama.cpp's own ``ggml_quantize_chunk`` (bytes) and
gguf-py's ``dequantize`` (values)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from quantbench.errors import ConfigError
from quantbench.quant.gguf import legacy
from quantbench.quant.gguf.search import make_qkx3_quants, make_qx_quants, nearest_int

CODECS = {c.name: c() for c in (legacy.F32Codec, legacy.F16Codec, legacy.BF16Codec,
                                 legacy.Q8_0Codec, legacy.Q4_0Codec, legacy.Q4_1Codec,
                                 legacy.Q5_0Codec, legacy.Q5_1Codec)}
QUANTS = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def _special(rng: np.random.Generator) -> np.ndarray:
    """One row per kind of awkward block: zeros, -0.0, constants, tiny values, ±ties."""
    x = rng.standard_normal((4, 256))
    x[0, :32] = 0.0
    x[0, 32:64] = -0.0
    x[1, :32] = 0.5
    x[1, 32:64] = -1.25
    x[2, :32] = 1e-30 * rng.standard_normal(32)
    x[2, 32:64] = 3e-39 * rng.standard_normal(32)               # float32 subnormals
    x[3, :32] = np.tile([1.0, -1.0], 16)                        # |max| tie, opposite signs
    x[3, 32:64] = 0.0
    x[3, 40] = -2.0                                             # a single non-zero
    return x


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    outliers = rng.standard_normal((3, 4096)) * 0.02
    outliers[rng.random(outliers.shape) < 0.01] *= 100
    xs = {
        "gauss": rng.standard_normal((7, 576)),
        "outliers": outliers,
        "special": _special(rng),
        "fp16": (rng.standard_normal((5, 1024)) * 0.05).astype(np.float16),   # an F16 GGUF
        "ints": rng.integers(-8, 9, (4, 256)),                  # exact .5 ties everywhere
        "sparse_pos": np.abs(rng.standard_normal((4, 256))) * (rng.random((4, 256)) < 0.3),
        "heavy": rng.standard_t(2, (3, 512)) * 1e-3,
        "tiny": rng.standard_normal((2, 128)) * 1e-30,
    }
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in xs.items()}


INPUTS = _inputs()


def _imatrix(kind: str, cols: int) -> np.ndarray | None:
    rng = np.random.default_rng(cols)
    if kind == "none":
        return None
    if kind == "skewed":
        return (rng.random(cols) ** 4 * 50).astype(np.float32)
    return rng.integers(0, 3, cols).astype(np.float32)          # with zero columns


@pytest.mark.parametrize("imatrix", ["none", "skewed", "zeros"])
@pytest.mark.parametrize("type_name", list(CODECS))
def test_bytes_equal_llamacpp(ggml_quantize, type_name, imatrix):
    codec = CODECS[type_name]
    for name, x in INPUTS.items():
        imp = _imatrix(imatrix, x.shape[1])
        ref = ggml_quantize(type_name, x, imp)
        ours = codec.quantize_rows(torch.from_numpy(x),
                                   None if imp is None else torch.from_numpy(imp))
        assert ours.dtype == torch.uint8 and tuple(ours.shape) == ref.shape, name
        bad = (ours.numpy() != ref).reshape(-1, codec.type_size).any(axis=1)
        assert not bad.any(), f"{type_name} {name} imatrix={imatrix}: {bad.sum()} blocks differ"


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_loose_blocks_are_rows_of_their_own(ggml_quantize, type_name):
    """``quantize`` on blocks with an importance and no ``sigma2`` = one-block rows; with the
    rows' ``sigma2`` it is ``quantize_rows``."""
    codec = CODECS[type_name]
    x = INPUTS["gauss"]
    imp = _imatrix("skewed", x.shape[1])
    blocks = torch.from_numpy(x).reshape(-1, 32)
    imp_blocks = torch.from_numpy(imp).reshape(1, -1).expand(x.shape[0], -1).reshape(-1, 32)
    ref = np.concatenate([ggml_quantize(type_name, b[None], i)
                          for b, i in zip(blocks.numpy(), imp_blocks.numpy())])
    assert np.array_equal(codec.quantize(blocks, imp_blocks).numpy(), ref)
    sigma2 = legacy.row_sigma2(torch.from_numpy(x)).repeat_interleave(x.shape[1] // 32)
    assert torch.equal(codec.quantize(blocks, imp_blocks, sigma2).reshape(x.shape[0], -1),
                       codec.quantize_rows(torch.from_numpy(x), torch.from_numpy(imp)))


@pytest.mark.parametrize("type_name", list(CODECS))
def test_dequantize_equals_gguf_py(type_name):
    codec = CODECS[type_name]
    qtype = gguf.GGMLQuantizationType[type_name]
    assert codec.type_id == int(qtype)
    assert (codec.block_size, codec.type_size) == gguf.GGML_QUANT_SIZES[qtype]
    for name in ("gauss", "outliers", "special", "fp16"):
        x = INPUTS[name]
        for imp in (None, _imatrix("skewed", x.shape[1])):
            data = codec.quantize_rows(torch.from_numpy(x),
                                       None if imp is None else torch.from_numpy(imp))
            ours = codec.dequantize_rows(data, x.shape[1])
            ref = gguf.quants.dequantize(data.numpy(), qtype)
            assert ours.dtype == torch.float32 and ours.shape == x.shape
            assert np.array_equal(ours.numpy(), ref), name


@pytest.mark.parametrize("type_name", list(CODECS))
def test_round_trip_is_stable(type_name):
    """Dequantized values quantize back to the same bytes (a grid point is its own nearest);
    not so for blocks whose fp16 scale underflows ("tiny", part of "special"), see below."""
    codec = CODECS[type_name]
    for name in ("gauss", "outliers", "fp16", "ints", "sparse_pos", "heavy"):
        x = torch.from_numpy(INPUTS[name])
        data = codec.quantize_rows(x)
        again = codec.quantize_rows(codec.dequantize_rows(data, x.shape[1]))
        assert torch.equal(again, data), name


def test_fp16_scale_underflow_dequantizes_to_zero():
    """1e-30 blocks: llama.cpp's fp16 ``d`` underflows to 0, so they decode as zeros."""
    x = torch.from_numpy(INPUTS["tiny"])
    for name in QUANTS:
        codec = CODECS[name]
        assert torch.count_nonzero(codec.dequantize_rows(codec.quantize_rows(x), 128)) == 0


def test_float_types():
    x = torch.tensor([[1.0, -2.5, 65504.0, 65520.0, 1e-8, float("inf"), float("nan"),
                       1.00390625, 1.01171875, -0.0, 3e-39, -1e39]])
    f16 = CODECS["F16"].quantize_rows(x).numpy().view(np.uint16).reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = x.numpy().astype(np.float16).view(np.uint16).reshape(-1)  # numpy: RNE too
    expected[6] = 0x7E00                                                  # ggml's NaN
    assert np.array_equal(f16, expected)
    bf16 = CODECS["BF16"].quantize_rows(x).view(torch.int16).reshape(-1).int() & 0xFFFF
    assert bf16[7].item() == 0x3F80 and bf16[8].item() == 0x3F82     # ties to even
    assert bf16[6].item() == 0x7FC0                                  # NaN stays quiet
    assert torch.equal(CODECS["F32"].dequantize_rows(CODECS["F32"].quantize_rows(x), 12)
                       .view(torch.int32), x.view(torch.int32))


@pytest.mark.parametrize("type_name", QUANTS)
def test_rows_not_multiple_of_32(type_name):
    codec = CODECS[type_name]
    with pytest.raises(ConfigError) as err:
        codec.quantize_rows(torch.zeros(2, 48))
    assert "\n" not in str(err.value) and "48" in str(err.value)
    with pytest.raises(ConfigError):
        codec.dequantize_rows(torch.zeros(2, 40, dtype=torch.uint8), 40)


def test_search_helpers_shapes():
    x = torch.from_numpy(INPUTS["gauss"]).reshape(-1, 32)
    assert torch.equal(nearest_int(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 2.49])),
                       torch.tensor([0, 2, 2, 0, -2, 2]))
    scale, levels = make_qx_quants(x, 8, 1, torch.ones_like(x))
    assert scale.shape == (x.shape[0],) and levels.shape == x.shape
    assert int(levels.min()) >= 0 and int(levels.max()) <= 15
    scale, levels, the_min = make_qkx3_quants(x, 15, None, -0.9, 0.05, 36, False)
    assert int(levels.max()) <= 15 and bool((the_min >= 0).all())
    err = ((scale[:, None] * levels - the_min[:, None]) - x).abs().amax(dim=1)
    assert bool((err <= scale * 1.5 + 1e-6).all())
