"""Attention-weighted value Hessians (``calibration/attention.py``): the statistic equals the
exact error a value-projection change causes at the attention output, the recording attention
leaves the block's outputs unchanged, and GPTQ on GGUF uses one Hessian per kv head."""
from __future__ import annotations

import pytest
import torch

from quantbench.calibration.attention import HeadHessians, value_hessians
from quantbench.calibration.pipeline import (_skeleton, capture_inputs, capture_output_input,
                                             materialize_block)
from quantbench.models.loader import load_model


def _attention_block(path, windows: torch.Tensor | None = None):
    model = load_model(path)
    skeleton = _skeleton(model)
    if windows is None:
        windows = torch.randint(2, 300, (3, 24), generator=torch.Generator().manual_seed(5))
    captured = capture_inputs(model, skeleton, windows, batch_size=2)
    layer = materialize_block(skeleton, model, 0)
    with torch.inference_mode():
        normed = [layer.input_layernorm(h) for h in captured.hidden]
    return model, layer.self_attn, normed, captured.kwargs


def _o_inputs(mixer, normed, kwargs) -> torch.Tensor:
    return torch.cat([f.reshape(-1, f.shape[-1])
                      for f in capture_output_input(mixer, "o_proj", normed, kwargs)])


@pytest.fixture(scope="module")
def tiny_mistral_sliding(tmp_path_factory):
    """Mistral with a sliding window shorter than the test windows (the mask is not causal)."""
    from transformers import MistralConfig, MistralForCausalLM

    from tests.conftest import make_tokenizer

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=320, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512, sliding_window=8)
    path = tmp_path_factory.mktemp("mistral") / "sliding"
    MistralForCausalLM(cfg).to(torch.float16).save_pretrained(str(path))
    make_tokenizer(path)
    return path


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_mistral_sliding"])
def test_head_hessians_give_the_exact_attention_output_error(which, request):
    """``‖Δ(attention output)‖² = n/2 · Σ_g tr(ΔW_g H_g ΔW_gᵀ)`` for any change ``ΔW`` of
    v_proj, measured with the model's own (SDPA) attention, causal or sliding-window; a change
    confined to one kv head's rows shows up in that head's Hessian only."""
    model, mixer, normed, kwargs = _attention_block(request.getfixturevalue(which))
    heads, kv = model.arch.head_counts(model.config)
    stat = value_hessians(mixer, normed, kwargs, heads, kv)
    assert stat.per_head.shape == (kv, 64, 64)
    n = sum(x.shape[0] * x.shape[1] for x in normed)
    v = mixer.v_proj.weight
    base = _o_inputs(mixer, normed, kwargs)
    g = torch.Generator().manual_seed(1)
    delta = 0.05 * torch.randn(v.shape, generator=g)
    rows = stat.rows(v.shape[0])
    for only in (None, 1):
        d = delta.clone()
        if only is not None:
            keep = torch.zeros(v.shape[0], dtype=torch.bool)
            keep[rows[only]] = True
            d[~keep] = 0
        with torch.no_grad():
            v.add_(d)
        moved = _o_inputs(mixer, normed, kwargs)
        with torch.no_grad():
            v.sub_(d)
        measured = float(((moved - base).double() ** 2).sum())
        predicted = sum(float(torch.einsum("ij,jk,ik->", d[r].double(), h.double(),
                                           d[r].double()))
                        for r, h in zip(rows, stat.per_head)) * n / 2
        assert measured == pytest.approx(predicted, rel=1e-3)
    # the attention mix differs from the plain input Hessian (tokens weighted by attention)
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in normed])
    plain = 2 * x.T @ x / n
    assert not torch.allclose(stat.per_head[0], plain, rtol=0.05)


def test_probe_restores_the_attention_implementation(tiny_llama):
    model, mixer, normed, kwargs = _attention_block(tiny_llama)
    before = mixer.config._attn_implementation
    out = _o_inputs(mixer, normed, kwargs)
    value_hessians(mixer, normed, kwargs, *model.arch.head_counts(model.config))
    assert mixer.config._attn_implementation == before
    assert torch.equal(_o_inputs(mixer, normed, kwargs), out)


def test_head_rows_must_split():
    stat = HeadHessians(torch.zeros(3, 4, 4))
    assert stat.rows(6) == [slice(0, 2), slice(2, 4), slice(4, 6)]
    with pytest.raises(ValueError, match="do not split"):
        stat.rows(7)


def _v_error(path, **options) -> tuple[float, float]:
    """GPTQ (Q4_K_M unless ``options`` say otherwise): v_proj of block 0 scored by the attention-output error and by the plain
    input-Hessian error on the calibration windows."""
    from quantbench.api import quantize
    from quantbench.calibration.data import CalibrationSpec, sample_windows

    windows = sample_windows(load_model(path).tokenizer(),
                             CalibrationSpec(4, 64, 0, None, False))
    model, mixer, normed, kwargs = _attention_block(path, windows)
    options = {"gguf_type": "Q4_K_M", **options}
    q = quantize(model, method="gptq", calib_samples=4, calib_len=64, **options)
    name = "model.layers.0.self_attn.v_proj.weight"
    tensors = {n: t for _, ts in q.iter_blocks() for n, t in ts.items()}
    W = model.weights.get(name).float()
    E = (W - tensors[name].dequantize().float()).double()
    stat = value_hessians(mixer, normed, kwargs, *model.arch.head_counts(model.config))
    att = sum(float(torch.einsum("ij,jk,ik->", E[r], h.double(), E[r]))
              for r, h in zip(stat.rows(W.shape[0]), stat.per_head))
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in normed]).double()
    return att, float(torch.einsum("ij,jk,ik->", E, 2 * x.T @ x / x.shape[0], E))


def test_gptq_gguf_values_follow_the_attention(tiny_llama_wide):
    """--attention-values (default) lowers v_proj's attention-output error against the plain
    input Hessian, which in turn is lower on its own objective."""
    att_on, plain_on = _v_error(tiny_llama_wide)
    att_off, plain_off = _v_error(tiny_llama_wide, attention_values=False)
    assert att_on < att_off
    assert plain_off < plain_on


@pytest.mark.parametrize("static_groups", [True, False])
def test_integer_gptq_values_follow_the_attention_when_asked(tiny_llama_wide, static_groups):
    """On an integer grid (opt-in) the heads share one act-order: one g_idx for the tensor
    (dynamic groups), and the same attention-output gain as on GGUF types."""
    grid = dict(gguf_type=None, bits=4, group_size=32, static_groups=static_groups)
    att_on, plain_on = _v_error(tiny_llama_wide, attention_values=True, **grid)
    att_off, plain_off = _v_error(tiny_llama_wide, **grid)  # default off on integer grids
    assert att_on < att_off
    assert plain_off < plain_on


def test_integer_attention_values_write_and_read_back(tiny_llama_wide, tmp_path):
    from quantbench.api import quantize, save
    from quantbench.formats.io import open_artifact

    q = quantize(str(tiny_llama_wide), method="gptq", bits=4, group_size=32, calib_samples=2,
                 calib_len=64, attention_values=True, static_groups=False)
    art = open_artifact(save(q, tmp_path / "w4", format="gptq"))
    name = "model.layers.1.self_attn.v_proj.weight"
    tensors = {n: t for _, ts in q.iter_blocks() for n, t in ts.items()}
    assert tensors[name].g_idx is not None
    assert torch.equal(art.quantized(name).dequantize(), tensors[name].dequantize())


def test_attention_values_need_rows_with_their_own_scales():
    from quantbench.errors import ConfigError
    from quantbench.quant.run import make_config
    from quantbench.registry import get_method

    config = make_config("gptq", 4, 0, True, attention_values=True)  # 0: one scale per tensor
    with pytest.raises(ConfigError, match="scale per row"):
        get_method("gptq")(config)


def test_weighted_head_hessians_give_the_weighted_output_error(tiny_llama):
    """With per-position weights w_q (a norm after the branch: 1/rms_q), the Hessians give
    ``Σ_q w_q² ‖Δ(attention output)_q‖²`` exactly."""
    model, mixer, normed, kwargs = _attention_block(tiny_llama)
    heads, kv = model.arch.head_counts(model.config)
    g = torch.Generator().manual_seed(2)
    weights = [torch.rand(x.shape[0], x.shape[1], 1, generator=g) + 0.1 for x in normed]
    stat = value_hessians(mixer, normed, kwargs, heads, kv, weights)
    n = sum(x.shape[0] * x.shape[1] for x in normed)
    v = mixer.v_proj.weight
    base = _o_inputs(mixer, normed, kwargs)
    d = 0.05 * torch.randn(v.shape, generator=g)
    with torch.no_grad():
        v.add_(d)
    moved = _o_inputs(mixer, normed, kwargs)
    with torch.no_grad():
        v.sub_(d)
    w = torch.cat([t.reshape(-1, 1) for t in weights]).double()
    measured = float(((moved - base).double().reshape(-1, moved.shape[-1]) ** 2 * w ** 2).sum())
    predicted = sum(float(torch.einsum("ij,jk,ik->", d[r].double(), h.double(), d[r].double()))
                    for r, h in zip(stat.rows(v.shape[0]), stat.per_head)) * n / 2
    assert measured == pytest.approx(predicted, rel=1e-3)
