"""The ``gguf`` format: our writer's file read back by gguf-py, by our reader and by llama.cpp."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from quantbench.api import quantize, save
from quantbench.cli import main
from quantbench.errors import ConfigError, FormatError
from quantbench.formats.io import open_artifact
from quantbench.models.gguf_import import permute_qk
from quantbench.models.loader import load_model
from quantbench.quant.gguf.codec import get_codec

TYPES = {"blk.0.attn_q.weight": "self_attn.q_proj", "blk.0.attn_k.weight": "self_attn.k_proj"}


def write(source, tmp_path, gguf_type, method="rtn", **opts):
    model = load_model(source)
    q = quantize(model, method=method, gguf_type=gguf_type, **opts)
    out = save(q, tmp_path / gguf_type, format="gguf")
    return model, q, out


@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q4_K_M", "Q6_K", "Q2_K"])
def test_written_bytes_are_our_codecs_and_read_back(tiny_llama_wide, tmp_path, gguf_type):
    model, q, out = write(tiny_llama_wide, tmp_path, gguf_type)
    art = open_artifact(out)
    assert art.format == "gguf" and (out / "model.gguf").is_file()
    assert sorted(art.quantized_names) == sorted(q.targets)  # embeddings and lm_head too
    assert "model.embed_tokens.weight" in q.targets and "lm_head.weight" in q.targets
    types = q.method.types
    for name in q.targets:
        qt = art.quantized(name)
        assert qt.grid.type == types[name]
        expect = get_codec(types[name]).quantize_rows(model.weights.get(name))
        assert torch.equal(qt.codes, expect), name
    manifest = art.manifest
    assert manifest["format"] == "gguf" and manifest["quantize"]["grid"]["type"] == gguf_type
    assert manifest["tensors"]["model.norm.weight"]["ggml_type"] == "F32"
    assert manifest["summary"]["size_bytes"] == (out / "model.gguf").stat().st_size


def test_file_holds_llama_cpp_layout(tiny_llama_wide, tmp_path):
    """gguf-py (llama.cpp's reader) sees llama.cpp names, ne order and Q/K rows interleaved."""
    model, q, out = write(tiny_llama_wide, tmp_path, "Q4_K_M")
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    assert ("output.weight" in tensors) == (not model.tied_embeddings)
    heads = {"self_attn.q_proj": 4, "self_attn.k_proj": 2}
    for gg, module in TYPES.items():
        t = tensors[gg]
        hf = f"model.layers.0.{module}.weight"
        assert [int(d) for d in t.shape] == list(reversed(model.weights.shape(hf)))
        ours = permute_qk(open_artifact(out).quantized(hf).dequantize(), heads[module])
        theirs = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.array_equal(ours.numpy(), np.asarray(theirs, dtype=np.float32).reshape(
            ours.shape))
    assert reader.fields["general.file_type"].contents() == 15  # LlamaFileType.MOSTLY_Q4_K_M
    assert reader.fields["general.quantization_version"].contents() == 2


def test_refusals_leave_nothing(tiny_llama, tmp_path, capsys):
    cases = [
        (["--type", "Q4_K_X"], "unknown GGUF type"),
        (["--type", "Q4_K_M", "--bits", "4"], "drop --bits"),
        (["--type", "Q4_K_M", "--method", "zeropoint"], "cannot target GGUF types"),
        (["--method", "zeropoint", "-g", "32", "--format", "gguf"], "pass --type"),
    ]
    for args, match in cases:
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as exc:
            main(["convert", str(tiny_llama), "-o", str(out), *args])
        assert exc.value.code != 0
        assert match in capsys.readouterr().err, args
        assert not out.exists() and not list(tmp_path.iterdir())


def test_truncated_and_corrupted_files(tiny_llama, tmp_path):
    _, _, out = write(tiny_llama, tmp_path, "Q8_0")
    data = (out / "model.gguf").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="truncated or corrupted"):
        open_artifact(bad / "cut.gguf")
    (bad / "cut.gguf").write_bytes(b"GGUX" + data[4:])
    with pytest.raises(FormatError, match="truncated or corrupted"):
        open_artifact(bad / "cut.gguf")


def test_unknown_tensor_type_is_refused(tiny_llama, tmp_path):
    """A GGUF holding a type we have no codec for (IQ4_NL, written with gguf-py)."""
    writer = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    for key, value in (("llama.embedding_length", 32), ("llama.feed_forward_length", 32),
                       ("llama.block_count", 1), ("llama.attention.head_count", 2),
                       ("llama.context_length", 64)):
        writer.add_uint32(key, value)
    raw = np.zeros((4, 18), dtype=np.uint8)
    writer.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(FormatError, match="IQ4_NL"):
        open_artifact(tmp_path / "iq.gguf")


def test_reads_llama_cpp_quantized_file(tiny_llama_wide, tmp_path, llamacpp):
    """llama-quantize's Q4_K_M of our F16 file: read back, every tensor's bytes equal ours."""
    _, _, f16 = write(tiny_llama_wide, tmp_path, "F16")
    _, q, ours = write(tiny_llama_wide, tmp_path, "Q4_K_M")
    theirs = tmp_path / "theirs.gguf"
    llamacpp.run("llama-quantize", f16 / "model.gguf", theirs, "Q4_K_M", "2")
    art, ref = open_artifact(theirs), open_artifact(ours)
    assert sorted(art.quantized_names) == sorted(ref.quantized_names)
    for name in ref.quantized_names:
        assert art.quantized(name).equal(ref.quantized(name)), name
    assert (ours / "model.gguf").stat().st_size == theirs.stat().st_size


def test_imatrix_method_runs_on_gguf(tiny_llama_wide, tmp_path):
    model, q, out = write(tiny_llama_wide, tmp_path, "Q4_K_M", method="imatrix",
                          calib_samples=2, calib_len=64)
    art = open_artifact(out)
    name = "model.layers.1.mlp.down_proj.weight"
    rtn = get_codec(q.method.types[name]).quantize_rows(model.weights.get(name))
    assert not torch.equal(art.quantized(name).codes, rtn)  # importance changed the search
    with pytest.raises(ConfigError, match="--format gguf"):
        quantize(model, method="imatrix", bits=4)


@pytest.mark.parametrize("gguf_type", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                       "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
                                       "Q5_K_S", "Q5_K_M", "Q6_K"])
def test_llama_cpp_runs_every_type_with_our_perplexity(tiny_llama_wide, tmp_path, gguf_type,
                                                       llama_vs_ours):
    """llama.cpp loads each file; its tokens are our evaluator's; its perplexity (second-half
    scoring, same windows) equals ours within 0.5 % (ours rounds activations as it does)."""
    model, _, out = write(tiny_llama_wide, tmp_path, gguf_type)
    ours, theirs, same_tokens = llama_vs_ours(out, model, ctx=128, chunks=6)
    assert same_tokens
    assert abs(ours / theirs - 1) < 0.005, (ours, theirs)


def test_gguf_source_to_hf_checkpoint_and_eval(tiny_llama_wide, tmp_path, monkeypatch):
    """A GGUF as a source: ``convert x.gguf --format dense`` writes its dequantized weights as
    an FP16 HF checkpoint; ``eval x.gguf --baseline SRC`` measures a bare GGUF file."""
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    _, _, out = write(tiny_llama_wide, tmp_path, "Q4_K_M")
    bare = tmp_path / "bare.gguf"
    bare.write_bytes((out / "model.gguf").read_bytes())
    main(["convert", str(bare), "-o", str(tmp_path / "hf")])
    hf = load_model(tmp_path / "hf")
    art = open_artifact(bare)
    assert art.manifest is None
    for name in art.quantized_names:
        assert torch.equal(hf.weights.get(name), art.quantized(name).dequantize().half()), name
    reloaded = load_model(bare)  # a GGUF path is a source too
    assert reloaded.weights.names() == hf.weights.names()
    main(["eval", str(bare), "--baseline", str(tiny_llama_wide), "--ctx", "64",
          "--max-tokens", "256", "--no-cache", "--json", str(tmp_path / "eval.json")])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert 0 < report["results"]["bare.gguf"]["kld_mean"] < 0.05


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_qk_rows_permuted_for_llama_arch_only(kind, tmp_path):
    """llama.cpp's converter interleaves Q/K rows for the llama arch and stores qwen2's as they
    are (its Qwen2Model does not permute); our writer and reader decide it in one place."""
    import transformers

    from tests.conftest import make_tokenizer

    cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
           "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[kind]
    torch.manual_seed(0)
    cfg = getattr(transformers, cls[0])(vocab_size=320, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=256,
                                         bos_token_id=0, eos_token_id=1)
    src = tmp_path / kind
    getattr(transformers, cls[1])(cfg).to(torch.float16).save_pretrained(str(src))
    make_tokenizer(src)
    model, _, out = write(src, tmp_path, "F16")
    tensors = {t.name: t for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    for gg, module in TYPES.items():
        hf = model.weights.get(f"model.layers.0.{module}.weight").float()
        if kind == "llama":
            hf = permute_qk(hf, 4 if module.endswith("q_proj") else 2)
        stored = np.asarray(tensors[gg].data, dtype=np.float32).reshape(hf.shape)
        assert np.array_equal(stored, hf.numpy()), (kind, gg)
    if kind == "qwen2":
        return  # our GGUF reader imports the llama arch only
    art = open_artifact(out)  # the reader undoes exactly what the writer did
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(art.weights.get(name).float(), model.weights.get(name).float())
