"""Qwen3 (``models/families/qwen3.py``) through every method, format and llama.cpp.

One tiny Qwen3 built from transformers' own ``Qwen3Config``: 64 wide, 4 query heads of
``head_dim`` 32 (≠ 64 / 4), ONE kv head, per-head q/k RMSNorms with non-trivial weights, Qwen's
byte-level BPE with its special tokens. Every method writes a format our reader opens into a
model that holds the q/k norms unquantized; transformers (and bitsandbytes, compressed-tensors,
GPTQModel in the peer venv) reload the files with our logits; llama.cpp's converter writes the
GGUF we write, and llama.cpp runs ours with our perplexity.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantbench.api import quantize, save
from quantbench.eval.run import artifact_factory, source_factory
from quantbench.formats.io import open_artifact
from quantbench.models.arch import arch_for
from quantbench.models.loader import load_model
from tests.conftest import assert_gptqmodel_reloads, bnb_float_model, needs_gptqmodel
from tests.formats.test_gguf_meta import (_qwen_tokenizer, assert_imports_back,
                                          assert_matches_converter,
                                          converter)  # noqa: F401 (a fixture, used by name)

QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
CALIB = {"calib_samples": 4, "calib_len": 32}
IDS = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))


def make_tiny_qwen3(directory: Path, tied: bool = False) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    # weights 5x the default spread: with transformers' 0.02 the logits are nearly flat and
    # resetting every k_norm moves the perplexity by 0.03 %, under the 0.5 % llama.cpp bound;
    # at 0.1 it moves it by 5.5 %, so the bound checks the q/k norms too
    cfg = Qwen3Config(vocab_size=320, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                      head_dim=32, max_position_embeddings=512, tie_word_embeddings=tied,
                      bos_token_id=None, eos_token_id=2, pad_token_id=0,
                      initializer_range=0.1)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # initialised to ones, the norms would hide a dropped or swapped one
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.uniform_(0.5, 1.5)
    model.to(torch.float16).save_pretrained(str(directory))
    _qwen_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory) -> Path:
    return make_tiny_qwen3(tmp_path_factory.mktemp("qwen3") / "tiny-qwen3")


@pytest.fixture(scope="module")
def model(tiny_qwen3):
    return load_model(tiny_qwen3)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))


def transformers_logits(path: Path, ids: torch.Tensor = IDS, **kwargs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs).eval()
    with torch.inference_mode():
        return hf(ids).logits.float()


def ours(art, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.inference_mode():
        return artifact_factory(art)()(ids).float()


# ------------------------------------------------------------------------ architecture data

def test_spec_and_gguf_names():
    spec = arch_for("qwen3")
    assert spec.gguf_arch == "qwen3" and not spec.gguf_qk_permute
    for hf, gg in (("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm"),
                   ("self_attn.q_proj", "attn_q")):
        name = f"model.layers.1.{hf}.weight"
        assert spec.gguf_tensor_name(name) == f"blk.1.{gg}.weight"
        assert spec.hf_tensor_name(f"blk.1.{gg}.weight") == name
    assert not set(QK_NORMS) & set(spec.linears)  # never quantized


def test_our_model_is_transformers_model(tiny_qwen3, model):
    """The source as our evaluator builds it (every tensor validated and loaded strictly, q/k
    norms included) gives transformers' own logits."""
    assert model.arch.family == "qwen3"
    with torch.inference_mode():
        got = source_factory(model)()(IDS).float()
    torch.testing.assert_close(got, transformers_logits(tiny_qwen3), rtol=0, atol=1e-5)


# -------------------------------------------------------------------------- every method

METHODS = {  # name: (quantize options, format written)
    "absmax": ({"method": "absmax", "bits": 4, "group_size": 32}, "compressed-tensors"),
    "zeropoint": ({"method": "zeropoint", "bits": 4, "group_size": 32}, "dense"),
    "gptq-act-order": ({"method": "gptq", "bits": 4, "group_size": 32, "act_order": True,
                        **CALIB}, "gptq"),
    "gptq-attention-values": ({"method": "gptq", "bits": 4, "group_size": 32,
                               "attention_values": True, **CALIB}, "compressed-tensors"),
    "awq": ({"method": "awq", "bits": 4, "group_size": 32, **CALIB}, "awq"),
    "nf4": ({"method": "nf4"}, "bitsandbytes"),
    "llm_int8": ({"method": "llm_int8", "calib_samples": 2, "calib_len": 64}, "bitsandbytes"),
    "gguf-imatrix": ({"method": "imatrix", "gguf_type": "Q4_0", **CALIB}, "gguf"),
    "gguf-gptq": ({"method": "gptq", "gguf_type": "Q4_0", **CALIB}, "gguf"),
    "gguf-awq": ({"method": "awq", "gguf_type": "Q4_0", **CALIB}, "gguf"),
    "exl2": ({"method": "exl2", "bpw": 4.6, "batch_size": 2, "measure_samples": 4, **CALIB},
             "exl2"),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_writes_and_reads_back(name, model, tiny_qwen3, tmp_path):
    """Each method quantizes the seven linears of both blocks, keeps the q/k norms as they
    were, and the artifact read back stays close to the source (quantization error only)."""
    options, fmt = METHODS[name]
    q = quantize(model, progress=False, **options)
    art = open_artifact(save(q, tmp_path / name, format=fmt, progress=False))
    linears = {f"model.layers.{i}.{lin}.weight" for i in range(2) for lin in model.arch.linears}
    assert linears <= set(q.targets)
    assert set(art.quantized_names) == (set() if fmt == "dense" else set(q.targets))
    back = dict(art.dequantized())
    for i in range(2):
        for norm in QK_NORMS:
            key = f"model.layers.{i}.{norm}.weight"
            assert torch.equal(back[key].float(), model.weights.get(key).float()), key
    ref = transformers_logits(tiny_qwen3)
    # 4-bit on a 64-wide model moves the logits by 27-39 % (RMS); a lost norm or a misplaced
    # head would move them by about as much as the logits themselves
    assert float((ours(art) - ref).norm() / ref.norm()) < 0.5


def test_awq_folding_is_exact_with_qk_norms(tiny_qwen3):
    """Scales folded input_layernorm → q/k/v, post_attention_layernorm → gate/up and
    up → down (the spec's ``scale_folding``; v → o does not fit one kv head) leave a Qwen3
    block's output unchanged: q/k_norm see the projections' outputs, which folding keeps."""
    from transformers import AutoModelForCausalLM

    from quantbench.quant.awq import fold_scales

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_qwen3), dtype=torch.float64).eval()
    x = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        before = hf(x).logits
    layer = hf.model.layers[0]
    g = torch.Generator().manual_seed(3)
    for prev, linears in arch_for("qwen3").scale_folding:
        mods = [layer.get_submodule(m) for m in linears]
        if layer.get_submodule(prev).weight.shape[0] != mods[0].weight.shape[1]:
            continue
        scales = torch.rand(mods[0].weight.shape[1], generator=g, dtype=torch.float64) + 0.5
        fold_scales(layer.get_submodule(prev), mods, scales)
    with torch.inference_mode():
        torch.testing.assert_close(hf(x).logits, before, rtol=1e-9, atol=1e-9)


def test_value_hessians_are_exact_with_one_kv_head(tiny_qwen3):
    """The attention-weighted value statistic with head_dim ≠ hidden / heads and one kv head:
    ``‖Δ(attention output)‖² = n/2 · tr(ΔW H ΔWᵀ)`` through Qwen3's own attention."""
    from quantbench.calibration.attention import value_hessians
    from tests.calibration.test_attention_values import _attention_block, _o_inputs

    model, mixer, normed, kwargs = _attention_block(tiny_qwen3)
    stat = value_hessians(mixer, normed, kwargs, *model.arch.head_counts(model.config))
    assert stat.per_head.shape == (1, 64, 64)
    n = sum(x.shape[0] * x.shape[1] for x in normed)
    v = mixer.v_proj.weight
    base = _o_inputs(mixer, normed, kwargs)
    delta = 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        v.add_(delta)
    moved = _o_inputs(mixer, normed, kwargs)
    measured = float(((moved - base).double() ** 2).sum())
    d = delta.double()
    predicted = float(torch.einsum("ij,jk,ik->", d, stat.per_head[0].double(), d)) * n / 2
    assert measured == pytest.approx(predicted, rel=1e-3)


# -------------------------------------------------------- formats reloaded by their runtime

def test_dense_and_compressed_tensors_reload_in_transformers(model, tmp_path):
    """dense: plain transformers, our logits. compressed-tensors: transformers decompresses
    our file to our reader's weights (bit for bit in float16), so its logits are ours up to
    that float16 rounding (under 1e-3 of the largest logit)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    dense = save(quantize(model, method="zeropoint", bits=4, group_size=32, progress=False),
                 tmp_path / "dense", format="dense", progress=False)
    torch.testing.assert_close(transformers_logits(dense), ours(open_artifact(dense)),
                               rtol=0, atol=1e-5)
    q = quantize(model, method="absmax", bits=4, group_size=32, progress=False)
    ct = save(q, tmp_path / "ct", format="compressed-tensors", progress=False)
    art = open_artifact(ct)
    mine = ours(art)
    assert (transformers_logits(ct) - mine).abs().max() < 1e-3 * mine.abs().max()
    hf = AutoModelForCausalLM.from_pretrained(
        str(ct), dtype=torch.float16, quantization_config=CompressedTensorsConfig(dequantize=True))
    for name in q.targets:
        weight = hf.get_submodule(name[: -len(".weight")]).weight
        assert torch.equal(weight, art.quantized(name).dequantize(torch.float16)), name
    with torch.inference_mode():
        theirs = hf.float()(IDS).logits
    assert (theirs - mine).abs().max() < 1e-3 * mine.abs().max()


@pytest.mark.parametrize("method,options", [("nf4", {"double_quant": True}),
                                            ("llm_int8", {"calib_samples": 2, "calib_len": 64})])
def test_bitsandbytes_reloads_with_our_logits(method, options, model, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = save(quantize(model, method=method, progress=False, **options), tmp_path / method,
               format="bitsandbytes", progress=False)
    hf = bnb_float_model(out)
    kind = "Linear8bitLt" if method == "llm_int8" else "Linear4bit"
    assert type(hf.model.layers[0].self_attn.k_proj).__name__ == kind
    with torch.no_grad():
        ref = hf(input_ids=IDS).logits.float()
    assert torch.equal(ours(open_artifact(out)), ref)


@pytest.mark.slow
@needs_gptqmodel
@pytest.mark.parametrize("fmt,options", [
    ("gptq", {"method": "gptq", "act_order": True, "symmetric": False, **CALIB}),
    ("awq", {"method": "awq", **CALIB})])
def test_gptq_and_awq_reload_in_transformers(fmt, options, model, tmp_path):
    """transformers + GPTQModel's CPU kernels (peer venv) load our gptq / awq files of Qwen3
    with our logits, up to their float16 arithmetic."""
    out = save(quantize(model, bits=4, group_size=32, progress=False, **options),
               tmp_path / fmt, format=fmt, progress=False)
    assert_gptqmodel_reloads(out, IDS, ours(open_artifact(out)), tmp_path)


# ------------------------------------------------------------------------------- GGUF

@pytest.mark.slow  # one converter run, one llama-quantize
def test_gguf_matches_converter_and_imports_back(model, tiny_qwen3, converter, llamacpp,
                                                 tmp_path):
    """llama.cpp's converter (Qwen3Model) writes our metadata, names (attn_q_norm,
    attn_k_norm), shapes and rows (no Q/K permutation); its file imports back to a Qwen3 with
    head_dim 32 and the original logits; llama-quantize's Q4_K_M of it holds every tensor in
    the type (the mixture sees 4 query heads per kv head) and bytes of our Q4_K_M."""
    ref = tmp_path / "ref.gguf"
    reader = assert_matches_converter(converter, tiny_qwen3, ref)
    assert reader.fields["general.architecture"].contents() == "qwen3"
    assert {"blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= \
        {t.name for t in reader.tensors}
    assert_imports_back(ref, tiny_qwen3, tmp_path / "back")
    llamacpp.run("llama-quantize", ref, tmp_path / "theirs.gguf", "Q4_K_M", "2")
    ours = save(quantize(model, method="rtn", gguf_type="Q4_K_M", progress=False),
                tmp_path / "ours", format="gguf", progress=False)
    mine, theirs = open_artifact(ours), open_artifact(tmp_path / "theirs.gguf")
    assert sorted(mine.quantized_names) == sorted(theirs.quantized_names)
    for name in mine.quantized_names:
        assert mine.quantized(name).equal(theirs.quantized(name)), name


@pytest.mark.slow  # llama.cpp runs
@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q4_K_M"])
def test_llama_cpp_runs_our_gguf_with_our_perplexity(gguf_type, model, tmp_path,
                                                     llama_vs_ours):
    out = save(quantize(model, method="rtn", gguf_type=gguf_type, progress=False),
               tmp_path / gguf_type, format="gguf", progress=False)
    mine, theirs, same_tokens = llama_vs_ours(out, model, ctx=64, chunks=4)
    assert same_tokens
    assert abs(mine / theirs - 1) < 0.005, (mine, theirs)


def test_sliding_window_gguf_is_refused(tiny_qwen3, tmp_path, capsys, monkeypatch):
    """llama.cpp's qwen3 has no sliding window: a config that uses one gets no GGUF, refused
    in one line before any work (the other formats still take it)."""
    from quantbench.formats.gguf_meta import arch_metadata
    from tests.faults.conftest import _qb, assert_no_leftovers, assert_refused

    config = json.loads((tiny_qwen3 / "config.json").read_text())
    assert [kv.key for kv in arch_metadata(config)][-2:] == ["qwen3.attention.key_length",
                                                             "qwen3.attention.value_length"]
    src = tmp_path / "sliding"
    shutil.copytree(tiny_qwen3, src)
    config.update(use_sliding_window=True, sliding_window=16, max_window_layers=1,
                  layer_types=["full_attention", "sliding_attention"])
    (src / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("COLUMNS", "400")
    out = tmp_path / "outputs"
    assert_refused(_qb(capsys, "convert", src, "-o", out / "q", "--type", "Q4_0", "--method",
                       "gptq"), "use_sliding_window", "llama.cpp")
    assert_no_leftovers(out)


# ---------------------------------------------------------------------------- validation

def _damaged(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"),
              {"format": "pt"})
    return dst


@pytest.mark.parametrize("case,edit,needles", [
    ("no-k-norm", lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"),
     ["model.layers.1.self_attn.k_norm.weight", "missing"]),
    ("q-norm-shape", lambda t: t.update({"model.layers.0.self_attn.q_norm.weight":
                                         torch.ones(16, dtype=torch.float16)}),
     ["model.layers.0.self_attn.q_norm.weight", "[16]", "[32]", "head_dim=32"]),
])
def test_qk_norms_are_validated(case, edit, needles, tiny_qwen3, tmp_path, capsys,
                                monkeypatch):
    """A Qwen3 checkpoint without a k_norm, or with a q_norm not ``head_dim`` long, is
    refused in one line before any work."""
    from tests.faults.conftest import _qb, assert_no_leftovers, assert_refused

    monkeypatch.setenv("COLUMNS", "400")
    src = _damaged(tiny_qwen3, tmp_path / case, edit)
    out = tmp_path / "outputs"
    assert_refused(_qb(capsys, "convert", src, "-o", out / "q"), *needles)
    assert_no_leftovers(out)


def test_gguf_without_a_k_norm_is_refused(model, tmp_path):
    """The same check on a GGUF source: a qwen3 file lacking one attn_k_norm is refused."""
    import gguf
    import numpy as np

    from quantbench.errors import ModelLoadError

    out = save(quantize(model, method="rtn", gguf_type="Q8_0", progress=False),
               tmp_path / "q8", format="gguf", progress=False)
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    writer = gguf.GGUFWriter(str(tmp_path / "no-k-norm.gguf"), "qwen3")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        types = [gguf.GGUFValueType(t) for t in field.types]
        writer.add_key_value(key, field.contents(), types[0],
                             sub_type=types[1] if len(types) > 1 else None)
    for t in reader.tensors:
        if t.name != "blk.1.attn_k_norm.weight":
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="tensor blk.1.attn_k_norm.weight is missing") as exc:
        load_model(tmp_path / "no-k-norm.gguf")
    assert "\n" not in str(exc.value)
