"""GPTQ onto GGUF block types (``gptq_gguf``): lower Hessian-weighted error than the codec's RTN
bytes, valid ggml blocks, RTN-like with an identity Hessian, and a whole Q4_K_M run that reads
back."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from quantbench.quant.gguf.codec import get_codec
from quantbench.quant.gguf.gptq_grid import gptq_gguf
from quantbench.quant.gptq import GPTQParams

TYPES = ["Q4_K", "Q6_K", "Q4_0", "Q5_1", "Q8_0"]
MARGIN = 0.5  # GPTQ's H-weighted error must be below half of RTN's (measured: ~4%)


def _layer(seed: int = 0, out_f: int = 64, in_f: int = 512, n: int = 1024
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``W [out, in]`` and ``H = 2·XᵀX/n`` for inputs with a few strong directions."""
    g = torch.Generator().manual_seed(seed)
    strong = torch.randn(n, 6, generator=g) @ torch.randn(6, in_f, generator=g)
    X = 2.0 * strong + torch.randn(n, in_f, generator=g)
    return torch.randn(out_f, in_f, generator=g), 2.0 * X.T @ X / n


def _h_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W − Q) H (W − Q)ᵀ)``."""
    E = (W - Q).double()
    return float(torch.einsum("ij,jk,ik->", E, H.double(), E))


@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("act_order", [True, False])
def test_lower_hessian_error_than_rtn(ggml_type, act_order):
    W, H = _layer()
    codec = get_codec(ggml_type)
    data, stats = gptq_gguf(W, H, ggml_type, GPTQParams(act_order=act_order))
    assert data.dtype == torch.uint8
    assert data.shape == (64, 512 // codec.block_size * codec.type_size)
    ours = _h_error(W, codec.dequantize_rows(data, 512), H)
    rtn = _h_error(W, codec.dequantize_rows(codec.quantize_rows(W), 512), H)
    assert ours < MARGIN * rtn, (ours, rtn)
    assert stats.proxy_error > 0 and not stats.damp_increased


@pytest.mark.parametrize("ggml_type", TYPES)
def test_bytes_are_valid_blocks(ggml_type):
    W, H = _layer(seed=1)
    data, _ = gptq_gguf(W, H, ggml_type)
    ours = get_codec(ggml_type).dequantize_rows(data, 512).numpy()
    theirs = gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[ggml_type])
    assert np.array_equal(ours, np.asarray(theirs, dtype=np.float32).reshape(ours.shape))


@pytest.mark.parametrize("ggml_type", TYPES)
def test_identity_hessian_is_rtn_on_the_fitted_grid(ggml_type):
    """No error feedback with ``H = I``: the codes are the fitted grid's nearest levels, i.e.
    the codec's own imatrix quantizer with a flat importance (bit for bit for k-quants, whose
    quantize is that same requantize) and close to its RTN in error otherwise."""
    W, _ = _layer(seed=2)
    codec = get_codec(ggml_type)
    eye = torch.eye(512)
    data, _ = gptq_gguf(W, eye, ggml_type, GPTQParams(act_order=False))
    flat = codec.quantize_rows(W, torch.ones(512))
    if ggml_type.endswith("_K"):
        assert torch.equal(data, flat)
    ours = _h_error(W, codec.dequantize_rows(data, 512), eye)
    rtn = _h_error(W, codec.dequantize_rows(codec.quantize_rows(W), 512), eye)
    assert ours < 1.05 * rtn, (ours, rtn)


def test_dead_kquant_subblocks_keep_fallback_codes():
    """A Q4_K sub-block whose ``d·sc`` is 0 decodes as llama.cpp's: zeros in, zeros out, and the
    bytes still decode through gguf-py."""
    W, H = _layer(seed=3)
    W[:5, :32] = 0.0
    W[7, :] = 0.0
    data, _ = gptq_gguf(W, H, "Q4_K")
    deq = get_codec("Q4_K").dequantize_rows(data, 512)
    assert torch.count_nonzero(deq[7]) == 0
    assert torch.isfinite(deq).all()


@pytest.mark.parametrize("ggml_type", ["F16", "BF16", "F32"])
def test_float_types_are_encoded(ggml_type):
    W, H = _layer(seed=4, in_f=64)
    data, _ = gptq_gguf(W, H, ggml_type)
    assert torch.equal(data, get_codec(ggml_type).quantize_rows(W))


def test_dead_columns_and_bad_rows():
    W, H = _layer(seed=5)
    H[:, 10] = 0.0
    H[10, :] = 0.0
    data, _ = gptq_gguf(W, H, "Q4_K")
    assert torch.isfinite(get_codec("Q4_K").dequantize_rows(data, 512)).all()
    with pytest.raises(Exception, match="multiple of 256"):
        gptq_gguf(W[:, :320], H[:320, :320], "Q4_K")


def test_gptq_q4_k_m_end_to_end(tiny_llama_wide, tmp_path):
    from quantbench.api import quantize, save
    from quantbench.formats.io import open_artifact
    from quantbench.models.loader import load_model

    model = load_model(tiny_llama_wide)
    q = quantize(model, method="gptq", gguf_type="Q4_K_M", calib_samples=2, calib_len=64)
    out = save(q, tmp_path / "gptq-q4km", format="gguf")
    art = open_artifact(out)
    types = q.method.types
    assert sorted(art.quantized_names) == sorted(q.targets)
    assert {types[n] for n in q.targets} >= {"Q4_K", "Q6_K"}
    for name in q.targets:
        qt = art.quantized(name)
        assert qt.grid.type == types[name], name
        assert torch.isfinite(qt.dequantize()).all()
    block = "model.layers.0.self_attn.q_proj.weight"
    rtn = get_codec(types[block]).quantize_rows(model.weights.get(block))
    assert not torch.equal(art.quantized(block).codes, rtn)  # GPTQ chose other codes
    embed = "model.embed_tokens.weight"                      # no Hessian: the RTN codec
    assert torch.equal(art.quantized(embed).codes,
                       get_codec(types[embed]).quantize_rows(model.weights.get(embed)))


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q8_0"])
@pytest.mark.parametrize("with_importance", [False, True])
def test_legacy_fit_round_pack_split(ggml_type, with_importance):
    """``pack(fit.fallback, fit)`` is ``quantize``; the element grid decodes as the bytes do;
    rounding decoded values back to the grid gives the same codes."""
    codec = get_codec(ggml_type)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, 32, generator=g)
    x[0] = 0.0
    imp = torch.rand(40, 32, generator=g) if with_importance else None
    params = codec.fit(x, imp)
    data = codec.pack(params.fallback, params)
    assert torch.equal(data, codec.quantize(x, imp))
    assert torch.equal(codec.dequantize_codes(params.fallback, params), codec.dequantize(data))
    codes = codec.codes_for(codec.dequantize(data), params)
    assert torch.equal(codec.pack(codes, params), data)


@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q6_K", "Q5_0"])
def test_stacked_rows_equal_one_sweep_each(ggml_type):
    """Linears sharing an input, stacked row-wise: block fits are per row, the sweep never
    mixes rows, so the bytes are those of separate sweeps (up to float summation order)."""
    from quantbench.quant.gguf.gptq_grid import gptq_gguf_rows

    W, H = _layer(seed=7, out_f=96)
    data, stats, losses = gptq_gguf_rows(W, H, ggml_type)
    assert float(losses.sum()) == pytest.approx(stats.proxy_error)
    for rows in (slice(0, 32), slice(32, 96)):
        one, one_stats = gptq_gguf(W[rows], H, ggml_type)
        assert (data[rows] == one).float().mean() > 0.995
        assert float(losses[rows].sum()) == pytest.approx(one_stats.proxy_error, rel=1e-3)


def test_pipeline_stacks_linears_of_one_type(tiny_llama_wide, monkeypatch):
    """Q4_K_M: q/k (Q4_K) and gate/up share a sweep; v_proj is swept per kv head on its
    attention-weighted Hessians (with ``attention_values=False`` it joins q/k when the mixture
    gives it their type)."""
    import quantbench.quant.gguf.gptq_grid as grid_mod
    from quantbench.api import quantize

    rows_seen = []
    original = grid_mod._gptq_gguf

    def spy(weight, *args, **kwargs):
        rows_seen.append(int(weight.shape[0]))
        return original(weight, *args, **kwargs)

    monkeypatch.setattr(grid_mod, "_gptq_gguf", spy)
    q = quantize(str(tiny_llama_wide), method="gptq", gguf_type="Q4_K_M", calib_samples=2,
                 calib_len=64)
    tensors = {n: t for _, ts in q.iter_blocks() for n, t in ts.items()}
    shape = {n: tuple(q.source.weights.shape(n)) for n in q.targets}
    q0 = "model.layers.0.self_attn.q_proj.weight"
    k0 = "model.layers.0.self_attn.k_proj.weight"
    v0 = "model.layers.0.self_attn.v_proj.weight"
    assert q.method.types[q0] == q.method.types[k0] == q.method.types[v0] == "Q4_K"
    assert shape[q0][0] + shape[k0][0] in rows_seen
    assert shape[v0][0] // 2 in rows_seen  # two kv heads
    gate = "model.layers.0.mlp.gate_proj.weight"
    assert 2 * shape[gate][0] in rows_seen
    assert tensors[q0].codes.shape[0] == shape[q0][0]
    assert tensors[v0].codes.shape[0] == shape[v0][0]
    rows_seen.clear()
    plain = quantize(str(tiny_llama_wide), method="gptq", gguf_type="Q4_K_M", calib_samples=2,
                     calib_len=64, attention_values=False)
    for _ in plain.iter_blocks():
        pass
    assert shape[q0][0] + shape[k0][0] + shape[v0][0] in rows_seen


def test_row_parts_on_worker_threads_equal_one_sweep(monkeypatch):
    import quantbench.quant.gptq as gptq_mod
    from quantbench.quant.gguf.gptq_grid import gptq_gguf_rows

    W, H = _layer(seed=8, out_f=96)
    one, one_stats, one_losses = gptq_gguf_rows(W, H, "Q4_K")
    monkeypatch.setattr(gptq_mod, "PART_MIN_ELEMENTS", 4096)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        split, stats, losses = gptq_gguf_rows(W, H, "Q4_K")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(split, one)  # the proxy losses: equal up to GEMM summation order
    assert torch.allclose(losses, one_losses, rtol=1e-4)
    assert stats.proxy_error == pytest.approx(one_stats.proxy_error, rel=1e-5)
