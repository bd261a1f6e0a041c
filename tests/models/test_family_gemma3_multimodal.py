"""Multimodal Gemma 3 (Gemma3ForConditionalGeneration): a tiny random model from transformers'
own Gemma3Config (2 text layers, a 1-layer SigLIP tower), saved by transformers in bfloat16
in the layout it writes (``language_model.model.*``, ``vision_tower.*``).

What is checked: the text decoder is quantized (calibration runs its blocks), the vision tower
and projector are copied through bit-exact in bfloat16 and reported (log line, manifest, card);
transformers reloads the outputs as the multimodal model with our reader's text logits; a GGUF
holds the text model only and says so."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from quantbench.api import quantize, save
from quantbench.formats.io import open_artifact
from quantbench.models.loader import load_model
from tests.conftest import TINY_VOCAB
from tests.models.test_family_gemma import make_gemma_tokenizer

IDS = torch.randint(4, TINY_VOCAB - 4, (2, 40), generator=torch.Generator().manual_seed(0))
KEPT = "kept in 16-bit: vision tower (32 tensors), multi-modal projector (2 tensors)"


def make_tiny_gemma3_mm(directory: Path) -> Path:
    import transformers

    text = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                query_pre_attn_scalar=32, max_position_embeddings=512, sliding_window=16,
                layer_types=["sliding_attention", "full_attention"], pad_token_id=0,
                eos_token_id=1, bos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision,
                                    mm_tokens_per_image=4, image_token_index=TINY_VOCAB - 1,
                                    boi_token_index=TINY_VOCAB - 3,
                                    eoi_token_index=TINY_VOCAB - 2)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # away from the zero init, so a missed 1 + w shows
                p.normal_(0, 0.5)
    directory.mkdir(parents=True)
    model.to(torch.bfloat16).save_pretrained(str(directory))
    make_gemma_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_gemma3_mm(tmp_path_factory) -> Path:
    return make_tiny_gemma3_mm(tmp_path_factory.mktemp("gemma3mm") / "mm")


def _stored(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update({k: v for k, v in load_file(str(file)).items() if k.startswith(prefix)})
    return out


def _vision(path: Path) -> dict[str, torch.Tensor]:
    """The vision tower and projector, named as the model's modules (either layout)."""
    tensors = {**_stored(path, "vision_tower."), **_stored(path, "multi_modal_projector."),
               **_stored(path, "model.vision_tower."),
               **_stored(path, "model.multi_modal_projector.")}
    return {k.removeprefix("model."): v for k, v in tensors.items()}


def test_loads_as_the_text_decoder_with_a_passthrough_vision_tower(tiny_gemma3_mm):
    from quantbench.models.torch_model import build_causal_lm
    from transformers import AutoModelForCausalLM

    model = load_model(tiny_gemma3_mm)
    assert model.arch.block_prefix == "model.language_model.layers"
    assert model.num_blocks == 2 and model.tied_embeddings
    assert {k: len(v) for k, v in model.passthrough_tensors().items()} == {
        "vision tower": 32, "multi-modal projector": 2}
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_gemma3_mm), dtype=torch.float32).eval()
    net = build_causal_lm(model.config, model.weights.iter(model.weights.names()))
    with torch.inference_mode():
        torch.testing.assert_close(net(IDS).logits, hf(IDS).logits)


def test_missing_text_config_is_one_line(tmp_path):
    from quantbench.errors import ModelLoadError
    from quantbench.models.families.gemma import GEMMA3_MM

    with pytest.raises(ModelLoadError, match="text_config") as info:
        GEMMA3_MM.hparams({"model_type": "gemma3"})
    assert "\n" not in str(info.value)


def test_gptq_text_quantized_vision_copied_and_reloaded(tiny_gemma3_mm, tmp_path, caplog):
    """GPTQ (act-order, attention-weighted values) over the text blocks; dense and
    compressed-tensors reload in transformers as Gemma3ForConditionalGeneration with our
    reader's logits; the vision tower is bit-exact bfloat16; manifest and card say it."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from quantbench.hub.card import render_model_card

    model = load_model(tiny_gemma3_mm)
    with caplog.at_level(logging.INFO, logger="quantbench"):
        q = quantize(model, method="gptq", bits=4, group_size=32, act_order=True,
                     static_groups=True, calib_samples=4, calib_len=32)
    assert any(KEPT in r.getMessage() for r in caplog.records)
    assert all(n.startswith("model.language_model.") for n in q.targets)
    want_vision = _vision(tiny_gemma3_mm)
    for fmt, kwargs in (("dense", {}), ("compressed-tensors", {
            "quantization_config": CompressedTensorsConfig(dequantize=True)})):
        out = save(q, tmp_path / fmt, format=fmt)
        got = _vision(out)
        assert got.keys() == want_vision.keys()
        assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want_vision[k])
                   for k in got)
        manifest = json.loads((out / "quantbench.json").read_text())
        assert manifest["passthrough"] == {
            "vision tower": {"tensors": 32, "dtype": "bfloat16"},
            "multi-modal projector": {"tensors": 2, "dtype": "bfloat16"}}
        art = open_artifact(out)
        from quantbench.eval.run import artifact_factory
        ours = artifact_factory(art)()(IDS)
        hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, **kwargs)
        assert type(hf).__name__ == "Gemma3ForConditionalGeneration"
        with torch.inference_mode():
            theirs = hf.eval()(IDS).logits
        # transformers dequantizes in the file's bfloat16: within its rounding
        torch.testing.assert_close(theirs, ours, rtol=0, atol=0.02 * ours.abs().max().item())
    assert "vision tower (32 tensors, bfloat16)" in render_model_card(out)


def test_nf4_bitsandbytes_keeps_the_vision_tower_16bit(tiny_gemma3_mm, tmp_path,
                                                       bnb_reference_path):
    from transformers import AutoModelForCausalLM

    from quantbench.eval.run import artifact_factory

    out = save(quantize(load_model(tiny_gemma3_mm), method="nf4"), tmp_path / "bnb",
               format="bitsandbytes")
    hf = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu")
    quantized = {n for n, m in hf.named_modules() if type(m).__name__ == "Linear4bit"}
    assert quantized and all(n.startswith("model.language_model.layers.") for n in quantized)
    for p in hf.parameters():
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    bnb_reference_path(hf)
    with torch.inference_mode():
        theirs = hf(input_ids=IDS).logits.float()
    ours = artifact_factory(open_artifact(out))()(IDS).float()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_gguf_holds_the_text_model_and_says_so(tiny_gemma3_mm, tmp_path, caplog):
    import gguf

    with caplog.at_level(logging.INFO, logger="quantbench"):
        out = save(quantize(load_model(tiny_gemma3_mm), method="rtn", gguf_type="Q8_0"),
                   tmp_path / "gguf", format="gguf")
    assert any("separate mmproj file" in r.getMessage() for r in caplog.records)
    reader = gguf.GGUFReader(str(next(out.glob("*.gguf"))))
    assert reader.fields["general.architecture"].contents() == "gemma3"
    names = {t.name for t in reader.tensors}
    assert "blk.1.attn_q_norm.weight" in names
    assert all(n.startswith(("blk.", "token_embd", "output")) for n in names)  # no v.*, mm.*
    manifest = json.loads((out / "quantbench.json").read_text())
    assert set(manifest["left_out"]) == {"vision tower", "multi-modal projector"}
    art = open_artifact(out)  # reads back as the text model
    assert art.config["model_type"] == "gemma3_text"


@pytest.mark.slow
def test_llama_cpp_runs_the_text_gguf_with_our_perplexity(tiny_gemma3_mm, tmp_path,
                                                          llama_vs_ours):
    """The text-only GGUF of a multimodal checkpoint runs in llama.cpp with the perplexity our
    evaluator gives the multimodal source's text path (no-BOS tokenizer copy: see
    test_family_gemma.py)."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_gemma3_mm, src)
    make_gemma_tokenizer(src, add_bos=False)
    model = load_model(src)
    out = save(quantize(model, method="rtn", gguf_type="Q8_0"), tmp_path / "q8", format="gguf")
    ours, theirs, same_tokens = llama_vs_ours(out, model, ctx=64, chunks=4)
    assert same_tokens
    assert abs(ours / theirs - 1) < 0.005, (ours, theirs)
