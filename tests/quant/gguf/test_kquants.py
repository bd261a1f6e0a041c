"""The k-quant codecs (Q2_K..Q6_K) against llama.cpp's own ``ggml_quantize_chunk`` (bytes, with
and without an imatrix) and gguf-py's ``dequantize`` (values), plus the fit / codes_for / pack
split that GPTQ-on-GGUF builds on."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from quantbench.quant.gguf.codec import get_codec
from quantbench.quant.gguf.kquants import KQuantCodec
from quantbench.quant.gguf.search import make_q3_quants, make_qp_quants, rdiv

KTYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def _special(rng: np.random.Generator) -> np.ndarray:
    """One 256-element super-block per awkward case (rows of 2048)."""
    x = rng.standard_normal((2, 8, 256))
    x[0, 0] = 0.0                                             # an all-zero super-block
    x[0, 1, :16] = 0.0                                        # zero 16- and 32-sub-blocks
    x[0, 1, 64:96] = -0.0
    x[0, 2] = 0.75                                            # constant super-blocks
    x[0, 3] = -1.5
    x[0, 4] = np.repeat(rng.standard_normal(16), 16)          # constant sub-blocks
    x[0, 5] = 1e-30 * rng.standard_normal(256)                # fp16 d underflows to 0
    x[0, 6] = 3e-39 * rng.standard_normal(256)                # float32 subnormals
    x[0, 7] = np.abs(x[0, 7]) + 2.0                           # all positive (min > 0)
    x[1, 0] = -np.abs(x[1, 0]) - 0.5                          # all negative
    x[1, 1] = np.tile([1.0, -1.0], 128)                       # |max| ties, opposite signs
    x[1, 2] = 0.0
    x[1, 2, 77] = -3.0                                        # a single non-zero
    x[1, 3] *= np.exp(rng.uniform(-12, 12, (16, 1))).repeat(16, 1).reshape(256)  # sub-scales
    x[1, 4] = rng.integers(-4, 5, 256) / 2                    # exact .5 ties
    x[1, 5, :128] = 0.0                                       # half a super-block zero
    x[1, 6] = 1e-7 * rng.standard_normal(256)
    x[1, 7] *= 1e4
    return x.reshape(2, 2048)


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2024)
    outliers = rng.standard_normal((4, 1536)) * 0.02
    outliers[rng.random(outliers.shape) < 0.01] *= 80
    xs = {
        "gauss": rng.standard_normal((5, 256)),
        "outliers": outliers,
        "wide": rng.standard_normal((3, 4096)) * 0.02,
        "special": _special(rng),
        "fp16": (rng.standard_normal((4, 1536)) * 0.03).astype(np.float16),  # an F16 GGUF
        "heavy": rng.standard_t(2, (2, 1024)) * 1e-2,
        "sparse_pos": np.abs(rng.standard_normal((2, 1024))) * (rng.random((2, 1024)) < 0.3),
    }
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in xs.items()}


INPUTS = _inputs()


def _imatrix(kind: str, cols: int) -> np.ndarray | None:
    rng = np.random.default_rng(cols + 7)
    if kind == "none":
        return None
    if kind == "skewed":                                      # llama-imatrix-like: Σ act²
        return (rng.random(cols) ** 4 * 50).astype(np.float32)
    if kind == "zeros":                                       # dead columns, small ints
        return rng.integers(0, 3, cols).astype(np.float32)
    return np.exp(rng.uniform(-12, 12, cols)).astype(np.float32)   # "range"


def _quantize(codec: KQuantCodec, x: np.ndarray, imp: np.ndarray | None) -> torch.Tensor:
    return codec.quantize_rows(torch.from_numpy(x), None if imp is None else torch.from_numpy(imp))


@pytest.mark.parametrize("imatrix", ["none", "skewed", "zeros", "range"])
@pytest.mark.parametrize("type_name", KTYPES)
def test_bytes_equal_llamacpp(ggml_quantize, type_name, imatrix):
    """Bit for bit ``quantize_row_<type>_ref`` (no imatrix) / ``_impl`` (imatrix); and both
    dequantizers (ours, gguf-py) agree on llama.cpp's bytes."""
    codec = get_codec(type_name)
    qtype = gguf.GGMLQuantizationType[type_name]
    for name, x in INPUTS.items():
        if imatrix == "range" and name not in ("gauss", "special", "wide"):
            continue
        imp = _imatrix(imatrix, x.shape[1])
        ref = ggml_quantize(type_name, x, imp)
        ours = _quantize(codec, x, imp)
        assert ours.dtype == torch.uint8 and tuple(ours.shape) == ref.shape, name
        bad = (ours.numpy() != ref).reshape(-1, codec.type_size).any(axis=1)
        assert not bad.any(), (f"{type_name} {name} imatrix={imatrix}: blocks "
                               f"{np.nonzero(bad)[0].tolist()} of {bad.size} differ")
        deq = codec.dequantize_rows(torch.from_numpy(ref), x.shape[1])
        np.testing.assert_array_equal(deq.numpy(), gguf.quants.dequantize(ref, qtype))


@pytest.mark.parametrize("type_name", KTYPES)
def test_dequantize_equals_gguf_py(type_name):
    codec = get_codec(type_name)
    qtype = gguf.GGMLQuantizationType[type_name]
    assert isinstance(codec, KQuantCodec) and codec.name == type_name
    assert codec.type_id == int(qtype)
    assert (codec.block_size, codec.type_size) == gguf.GGML_QUANT_SIZES[qtype]
    for name in ("gauss", "special", "fp16"):
        x = INPUTS[name]
        for imp in (None, _imatrix("skewed", x.shape[1])):
            data = _quantize(codec, x, imp)
            ours = codec.dequantize_rows(data, x.shape[1])
            assert ours.dtype == torch.float32 and ours.shape == x.shape
            assert np.array_equal(ours.numpy(), gguf.quants.dequantize(data.numpy(), qtype))


@pytest.mark.parametrize("type_name", KTYPES)
def test_dequantize_any_bytes(type_name):
    """Every bit of the layout decodes as gguf-py decodes it (random blocks, finite fp16s)."""
    codec = get_codec(type_name)
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, (64, codec.type_size), dtype=np.uint8)
    halves = {"Q2_K": (80, 84), "Q3_K": (108, 110), "Q4_K": (0, 4), "Q5_K": (0, 4),
              "Q6_K": (208, 210)}[type_name]
    fp = (rng.standard_normal((64, (halves[1] - halves[0]) // 2)) * 0.01).astype(np.float16)
    data[:, halves[0]:halves[1]] = fp.view(np.uint8)
    ours = codec.dequantize(torch.from_numpy(data)).numpy()
    ref = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name]).reshape(64, 256)
    assert np.array_equal(ours, ref)
    codes, params = codec.unpack(torch.from_numpy(data))
    assert torch.equal(codec.pack(codes, params), torch.from_numpy(data))   # lossless layout


@pytest.mark.parametrize("type_name", KTYPES)
def test_fit_codes_pack_split(type_name):
    """quantize = pack(codes_for(x, fit(x)), fit(x)); unpacked parameters give back the
    stored codes; element_grid decodes exactly as dequantize."""
    codec = get_codec(type_name)
    x = torch.from_numpy(INPUTS["special"]).reshape(-1, 256)
    imp = torch.from_numpy(np.tile(_imatrix("skewed", 2048), 2)).reshape(-1, 256)
    for importance in (None, imp):
        params = codec.fit(x, importance)
        codes = codec.codes_for(x, params)
        assert codes.shape == x.shape
        assert int(codes.min()) >= 0 and int(codes.max()) <= codec.qmax
        data = codec.pack(codes, params)
        assert torch.equal(data, codec.quantize(x, importance))
        codes2, params2 = codec.unpack(data)
        assert torch.equal(codes2, codes)
        assert torch.equal(params2.d, params.d) and torch.equal(params2.dmin, params.dmin)
        assert torch.equal(codec.codes_for(x, params2), codes)
        scale, offset = codec.element_grid(params)
        grid = scale * (codes - codec.zero_point).float() - offset
        assert torch.equal(grid, codec.dequantize(data))
        assert torch.equal(codec.dequantize_codes(codes, params), codec.dequantize(data))
        for col in (0, 37, 255):                              # GPTQ rounds one column at a time
            assert torch.equal(codec.round_to_grid(x[:, col], scale[:, col], offset[:, col],
                                                   params.fallback[:, col]), codes[:, col])


@pytest.mark.parametrize("type_name", KTYPES)
def test_round_trip_and_error(type_name):
    """Quantization error shrinks with the bits; zero blocks decode to zeros."""
    codec = get_codec(type_name)
    x = torch.from_numpy(INPUTS["wide"])
    deq = codec.dequantize_rows(codec.quantize_rows(x), x.shape[1])
    rel = float((deq - x).norm() / x.norm())
    bound = {"Q2_K": 0.45, "Q3_K": 0.25, "Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03}[type_name]
    assert rel < bound
    zeros = torch.zeros(2, 256)
    assert torch.count_nonzero(codec.dequantize(codec.quantize(zeros))) == 0


def test_rdiv_is_one_rounding():
    """``c / tensor`` in torch is ``c * (1/t)``; llama.cpp's ``nmax/(max - min)`` is one
    division."""
    t = torch.from_numpy(np.random.default_rng(0).uniform(0.1, 10, 4096).astype(np.float32))
    exact = (np.float32(15) / t.numpy()).view(np.uint32)
    assert np.array_equal(rdiv(15, t).numpy().view(np.uint32), exact)


def test_small_searches():
    scale, levels = make_qp_quants(torch.zeros(2, 8), 63, torch.ones(2, 8))
    assert torch.equal(scale, torch.zeros(2)) and torch.equal(levels, torch.zeros(2, 8).long())
    x = torch.tensor([[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 63.0, 0.0]])
    scale, levels = make_qp_quants(x, 63, torch.ones_like(x))
    assert float(scale) == pytest.approx(1.0) and levels[0].tolist() == [1, 2, 4, 8, 16, 32,
                                                                         63, 0]
    x = torch.linspace(-1, 1, 16).reshape(1, 16)
    scale, levels = make_q3_quants(x, 4, True)
    assert int(levels.min()) >= 0 and int(levels.max()) <= 7
    err = (scale * (levels - 4).float() - x).abs().max()
    assert float(err) <= float(scale.abs()) * 0.75
