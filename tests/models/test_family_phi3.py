"""Phi-3 (``model_type`` phi3): fused ``qkv_proj`` / ``gate_up_proj`` through methods, formats,
GGUF (llama.cpp's converter and runtime) and validation, on tiny models built in-process from
transformers' ``Phi3Config`` (multi-head attention, as Phi-3-mini; a grouped-query, tied,
partial-rotary, sliding-window variant for the GGUF conventions of Phi-4-mini)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantbench.api import quantize, save
from quantbench.errors import ConfigError, ModelLoadError
from quantbench.formats.io import open_artifact
from quantbench.models.families.phi3 import PHI3
from quantbench.models.loader import load_model
from quantbench.models.torch_model import build_causal_lm
from tests.conftest import (TINY_VOCAB, assert_gptqmodel_reloads, bnb_float_model,
                            make_tokenizer, needs_gptqmodel)
from tests.formats.test_gguf_meta import (assert_imports_back, assert_matches_converter,
                                          assert_quantizes_like_llama_quantize,
                                          converter)  # noqa: F401  (a fixture)

QKV = "model.layers.0.self_attn.qkv_proj.weight"


def make_tiny_phi3(directory: Path, tokenizer_from: Path | None = None, **extra) -> Path:
    """A random Phi-3 with a byte-level BPE tokenizer declared as GPT2Tokenizer (Phi-4-mini's:
    the converter reads it as BPE; Phi-3's SentencePiece reads as llama's)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(**{"vocab_size": TINY_VOCAB, "hidden_size": 64, "intermediate_size": 128,
                        "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 4, "max_position_embeddings": 512,
                        "original_max_position_embeddings": 512, "bos_token_id": 0,
                        "eos_token_id": 1, "pad_token_id": 1, **extra})
    Phi3ForCausalLM(cfg).to(torch.float16).save_pretrained(str(directory))
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (directory / name).write_bytes((tokenizer_from / name).read_bytes())
        return directory
    make_tokenizer(directory)
    path = directory / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()),
                                "tokenizer_class": "GPT2Tokenizer"}))
    return directory


@pytest.fixture(scope="module")
def tiny_phi3(tmp_path_factory) -> Path:
    return make_tiny_phi3(tmp_path_factory.mktemp("phi3") / "phi3")


@pytest.fixture(scope="module")
def tiny_phi4ish(tmp_path_factory, tiny_phi3) -> Path:
    """Grouped-query (2 kv heads), tied embeddings, half the head rotated, a sliding window."""
    return make_tiny_phi3(tmp_path_factory.mktemp("phi3") / "phi4ish", tiny_phi3,
                          num_key_value_heads=2,
                          tie_word_embeddings=True, sliding_window=256, rope_parameters={
                              "rope_type": "default", "rope_theta": 250000.0,
                              "partial_rotary_factor": 0.5})


def _ids() -> torch.Tensor:
    return torch.randint(2, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def _tensor(q, name: str):
    """A quantized model's tensor (blocks are computed once and stored)."""
    return next(t[name] for _, t in q.iter_blocks() if name in t)


def _reader_logits(out: Path) -> torch.Tensor:
    art = open_artifact(out)
    with torch.inference_mode():
        return build_causal_lm(art.config, art.dequantized(), torch.float32)(_ids()).logits


# ------------------------------------------------------------------------------ architecture

def test_fused_parts_and_read_back_logits(tiny_phi3):
    """The parts' rows are those transformers slices; our reader's model is transformers'."""
    from transformers import AutoModelForCausalLM

    model = load_model(tiny_phi3)
    assert model.arch is PHI3
    rows = PHI3.fused_parts("self_attn.qkv_proj").rows(model.config)
    assert rows["self_attn.v_proj"] == slice(128, 192)
    assert PHI3.stored("mlp.up_proj", model.config) == ("mlp.gate_up_proj", slice(128, 256))
    out = save(quantize(model, method="absmax", bits=8, group_size=32), Path(tiny_phi3).parent
               / "dense8", format="dense")
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.inference_mode():
        torch.testing.assert_close(hf(_ids()).logits, _reader_logits(out), rtol=0, atol=1e-5)


def test_wrong_sized_qkv_is_refused_in_one_line(tiny_phi3, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in Path(tiny_phi3).iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(bad / "model.safetensors"))
    weights[QKV] = weights[QKV][:160].clone()  # 2.5 heads of v instead of 4
    save_file(weights, str(bad / "model.safetensors"), {"format": "pt"})
    with pytest.raises(ModelLoadError) as err:
        load_model(bad)
    message = str(err.value)
    assert "\n" not in message and "self_attn.qkv_proj" in message and "[160, 64]" in message
    assert "num_key_value_heads" in message


# ----------------------------------------------------------------------------------- methods

def test_gptq_values_read_the_value_rows_of_qkv(tiny_phi3):
    """Attention-weighted values: qkv_proj's v rows are swept per kv head on their own
    Hessians, its q/k rows on the input Hessian as without them."""
    model = load_model(tiny_phi3)
    kw = dict(method="gptq", bits=4, group_size=32, act_order=False, calib_samples=4,
              calib_len=64)
    plain = _tensor(quantize(model, attention_values=False, **kw), QKV).dequantize()
    values = _tensor(quantize(model, attention_values=True, **kw), QKV).dequantize()
    torch.testing.assert_close(values[:128], plain[:128], rtol=0, atol=1e-6)
    assert not torch.equal(values[128:], plain[128:])


def test_exl2_measures_and_allocates_the_fused_linears(tiny_phi3):
    model = load_model(tiny_phi3)
    q = quantize(model, method="exl2", bpw=4.6, calib_samples=4, calib_len=32, batch_size=2,
                 measure_samples=4)
    assert QKV in q.targets


def test_awq_folds_into_the_parts_and_keeps_the_float_function(tiny_phi3):
    """v→o scales divide only qkv_proj's v rows, up→down only gate_up_proj's up rows: with
    clipping off the searched block computes what the source block computes."""
    from quantbench.calibration.pipeline import (BlockContext, _skeleton, capture_inputs,
                                                 materialize_block)
    from quantbench.quant.methods.awq import awq_block
    from quantbench.quant.run import make_config

    model = load_model(tiny_phi3)
    config = make_config("awq", 3, 16, False, clip=False, calib_samples=4, calib_len=32)
    windows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    skeleton = _skeleton(model)
    captured = capture_inputs(model, skeleton, windows, batch_size=2)
    layer = materialize_block(skeleton, model, 0)

    def run() -> list[torch.Tensor]:
        with torch.inference_mode():
            outs = [layer(h, **kw) for h, kw in zip(captured.hidden, captured.kwargs)]
        return [o[0] if isinstance(o, tuple) else o for o in outs]

    ref = run()
    targets = {n for n in model.weights.names() if n.endswith("proj.weight")}
    result = awq_block(BlockContext(model, layer, 0, captured.hidden, captured.kwargs, targets),
                       config)
    for prev in ("input_layernorm", "self_attn.v_proj", "post_attention_layernorm",
                 "mlp.up_proj"):
        assert f"model.layers.0.{prev}.awq_scales" in result, prev
    for got, want in zip(run(), ref):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_awq_saved_search_reapplies(tiny_phi3, tmp_path):
    from quantbench.quant.methods.awq import SEARCH_FILE

    model = load_model(tiny_phi3)
    kw = dict(method="awq", bits=4, group_size=32, symmetric=False)
    out = save(quantize(model, calib_samples=4, calib_len=32, n_grid=5, **kw), tmp_path / "a",
               format="dense")
    again = quantize(model, search_file=str(out / SEARCH_FILE), **kw)
    out2 = save(again, tmp_path / "b", format="dense")
    a, b = open_artifact(out).weights, open_artifact(out2).weights
    for name in a.names():
        x, y = a.get(name).float(), b.get(name).float()
        assert (x - y).abs().max() <= 1e-3 * x.abs().max(), name


# ----------------------------------------------------------------------------------- formats

@pytest.mark.parametrize("method,fmt", [("absmax", "compressed-tensors"),
                                        ("nf4", "bitsandbytes"), ("llm_int8", "bitsandbytes")])
def test_transformers_reloads_with_our_logits(tiny_phi3, tmp_path, method, fmt):
    """transformers loads the fused linears under their own names from our files (packed
    compressed-tensors; bitsandbytes 4-bit and 8-bit modules) with our reader's logits."""
    from transformers import AutoModelForCausalLM

    opts = {"absmax": dict(bits=4, group_size=32), "nf4": {},
            "llm_int8": dict(calib_samples=2, calib_len=32)}[method]
    out = save(quantize(load_model(tiny_phi3), method=method, **opts), tmp_path / "o",
               format=fmt)
    if fmt == "bitsandbytes":
        from quantbench.eval.run import artifact_factory

        hf = bnb_float_model(out)
        kind = "Linear8bitLt" if method == "llm_int8" else "Linear4bit"
        assert type(hf.model.layers[0].self_attn.qkv_proj).__name__ == kind
        with torch.no_grad():
            ref = hf(input_ids=_ids()).logits.float()
        ours = artifact_factory(open_artifact(out))()(_ids()).float()
        assert torch.equal(ours, ref), (ours - ref).abs().max()
        return
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.inference_mode():
        assert (hf(_ids()).logits - _reader_logits(out)).abs().max() < 1e-3


@pytest.mark.parametrize("method,fmt", [("gptq", "gptq"), ("awq", "awq")])
def test_gptq_and_awq_files_read_back(tiny_phi3, tmp_path, method, fmt):
    """The packed fused linears read back as quantized (transformers loads these formats only
    through GPTQModel: tests/formats/test_*_runtime.py run it where its venv exists)."""
    q = quantize(load_model(tiny_phi3), method=method, bits=4, group_size=32, calib_samples=2,
                 calib_len=32, **({"act_order": True} if method == "gptq" else {}))
    out = save(q, tmp_path / fmt, format=fmt)
    art = open_artifact(out)
    for name in (QKV, "model.layers.1.mlp.gate_up_proj.weight"):
        assert art.quantized(name).equal(_tensor(q, name)), name


@pytest.mark.slow
@needs_gptqmodel
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptqmodel_reloads_the_fused_linears(tiny_phi3, tmp_path, method):
    """transformers + GPTQModel's CPU kernels (peer venv) load our gptq / awq files of Phi-3
    with qkv_proj and gate_up_proj quantized as stored, and give our logits."""
    q = quantize(load_model(tiny_phi3), method=method, bits=4, group_size=32, calib_samples=2,
                 calib_len=32, progress=False, **({"act_order": True} if method == "gptq"
                                                  else {}))
    out = save(q, tmp_path / method, format=method, progress=False)
    assert_gptqmodel_reloads(out, _ids(), _reader_logits(out), tmp_path)


# -------------------------------------------------------------------------------------- GGUF

@pytest.mark.slow  # a converter run
def test_gguf_matches_the_converter_and_imports_back(tiny_phi4ish, converter, tmp_path):
    """Metadata (the converter's own key order, rotary share, sliding window), tensor names
    (attn_qkv; ffn_up holding gate and up) and rows equal llama.cpp's converter output, which
    imports back to the original logits."""
    reader = assert_matches_converter(converter, tiny_phi4ish, tmp_path / "ref.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("phi3.")}
    assert fields["phi3.rope.dimension_count"] == 8
    assert fields["phi3.attention.sliding_window"] == 256
    assert_imports_back(tmp_path / "ref.gguf", tiny_phi4ish, tmp_path / "back")


@pytest.mark.slow  # a converter run, one llama-quantize
def test_q4_k_m_is_llama_quantize_byte_for_byte(tiny_phi3, converter, llamacpp, tmp_path):
    """Rows of 256 and 512 (whole k-quant super-blocks): llama-quantize classes the fused
    attn_qkv as attn_v (Q6_K on the use-more-bits layer, counted among attn_v) and writes
    every tensor in our type with our bytes."""
    wide = make_tiny_phi3(tmp_path / "wide", tiny_phi3, hidden_size=256,
                          intermediate_size=512)
    reader = assert_quantizes_like_llama_quantize(llamacpp, converter, wide, "Q4_K_M",
                                                  tmp_path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert (types["blk.0.attn_qkv.weight"], types["blk.1.attn_qkv.weight"]) == ("Q4_K", "Q6_K")


@pytest.mark.slow
def test_llama_cpp_runs_our_gptq_gguf_with_our_perplexity(tiny_phi4ish, tmp_path,
                                                          llama_vs_ours):
    """GPTQ onto a GGUF type (attention-weighted values on qkv_proj's v rows, each block
    with its own act-order), written and run by llama-perplexity: our number within 0.5 %."""
    model = load_model(tiny_phi4ish)
    q = quantize(model, method="gptq", gguf_type="Q8_0", calib_samples=2, calib_len=64)
    out = save(q, tmp_path / "q8", format="gguf")
    ours, theirs, same_tokens = llama_vs_ours(out, model, ctx=64, chunks=4)
    assert same_tokens
    assert abs(ours / theirs - 1) < 0.005, (ours, theirs)


# ---------------------------------------------------------------------------- LongRoPE GGUF

HALF = 8  # rotary dimensions / 2 (head_dim 16)
LONG = [1.0 + 0.25 * i for i in range(HALF)]
SHORT = [1.0 + 0.05 * i for i in range(HALF)]


def _longrope(**rope) -> dict:
    return {"max_position_embeddings": 256, "original_max_position_embeddings": 64,
            "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                "long_factor": LONG, "short_factor": SHORT, **rope}}


@pytest.fixture(scope="module")
def tiny_longrope(tmp_path_factory, tiny_phi3) -> Path:
    """Phi-3.5-mini's RoPE in small: LongRoPE factors (distinct per frequency) past an
    original context of 64 positions; weights five times the default scale, so positions
    move its perplexity (at the default, near-uniform logits hide which factors ran)."""
    return make_tiny_phi3(tmp_path_factory.mktemp("phi3") / "longrope", tiny_phi3,
                          initializer_range=0.1, **_longrope())


def test_longrope_gguf_reads_back_with_its_factors(tiny_longrope, tmp_path):
    """Our GGUF holds the factors as the converter's F32 tensors (first, outside the
    manifest) and its attention scale; our reader turns them back into the same
    rope_parameters, and its model computes the source's logits past the original context."""
    import gguf
    from transformers import AutoModelForCausalLM

    model = load_model(tiny_longrope)
    out = save(quantize(model, method="rtn", gguf_type="Q8_0"), tmp_path / "q8", format="gguf")
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    assert [t.name for t in reader.tensors[:2]] == ["rope_factors_long.weight",
                                                    "rope_factors_short.weight"]
    assert reader.tensors[0].data.tolist() == pytest.approx(LONG)
    assert list(reader.fields)[4] == "phi3.rope.scaling.attn_factor"  # after the GGUF. keys
    art = open_artifact(out)
    assert {k: art.config["rope_parameters"][k] for k in ("rope_type", "long_factor",
            "short_factor")} == {"rope_type": "longrope", "long_factor": LONG,
                                 "short_factor": SHORT}
    assert "rope_factors_long.weight" not in json.loads((out / "quantbench.json").read_text())[
        "tensors"]
    ids = torch.randint(2, 300, (1, 100), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_longrope), dtype=torch.float32).eval()
    with torch.inference_mode():
        ours = build_causal_lm(art.config, art.dequantized(), torch.float32)(ids).logits
        ref = hf(ids).logits
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()  # Q8_0 rounding only


@pytest.mark.parametrize("rope,what", [({"long_factor": LONG[:4]}, "long_factor must list 8"),
                                       ({"rope_type": "yarn"}, "'yarn'")])
def test_unwritable_longrope_is_refused_before_work(tiny_phi3, tmp_path, rope, what):
    from quantbench.models.families.phi3 import gguf_generate

    config = {**load_model(tiny_phi3).config, **_longrope(**rope)}
    with pytest.raises(ConfigError, match=what) as err:
        gguf_generate(config)
    assert "\n" not in str(err.value)


@pytest.mark.slow  # a converter run
def test_longrope_gguf_matches_the_converter_and_imports_back(tiny_longrope, converter,
                                                              tmp_path):
    """The converter's attn_factor key (before general.type), its rope_factors_long/short F32
    tensors and every other key and tensor are ours; its file imports back to the original
    rope_parameters and logits (200 positions: the long factors)."""
    reader = assert_matches_converter(converter, tiny_longrope, tmp_path / "ref.gguf")
    assert "rope_factors_short.weight" in {t.name for t in reader.tensors}
    assert_imports_back(tmp_path / "ref.gguf", tiny_longrope, tmp_path / "back")


@pytest.mark.slow
def test_llama_cpp_runs_our_longrope_gguf_with_our_perplexity(tiny_longrope, tmp_path,
                                                              llama_vs_ours):
    """llama.cpp takes the long factors when its context (padded to 256) exceeds the original
    64 positions, transformers when the sequence does: windows of 128 make both take them
    (at --ctx 64 llama.cpp runs long, transformers short: 2 % apart on this model)."""
    model = load_model(tiny_longrope)
    out = save(quantize(model, method="rtn", gguf_type="Q8_0"), tmp_path / "q8", format="gguf")
    ours, theirs, same_tokens = llama_vs_ours(out, model, ctx=128, chunks=2)
    assert same_tokens
    assert abs(ours / theirs - 1) < 0.005, (ours, theirs)
