"""``inspect`` describes an artifact from its headers (``Artifact.summary``, ``HeaderWeights``,
the GGUF header walk) exactly as decoding every tensor through the format's reader does: the
oracle below is the reader-based description inspect gave before, run on an artifact of every
format and layout variant, on checkpoints quantbench did not write (no manifest), a plain
Hugging Face checkpoint and a bare GGUF."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

CALIB = ["--calib-samples", "4", "--calib-len", "32"]
ARTIFACTS = {
    "dense": ["-g", "32"],
    "ct-zero-point-g32": ["-f", "compressed-tensors", "-g", "32"],
    "ct-symmetric-channel": ["-f", "compressed-tensors", "-m", "absmax", "-g", "-1"],
    "ct-tensor-8bit": ["-f", "compressed-tensors", "-g", "0", "-b", "8"],
    "gptq-zero-point": ["-f", "gptq", "-g", "32"],
    "gptq-symmetric-3bit": ["-f", "gptq", "-m", "absmax", "-g", "32", "-b", "3"],
    "gptq-dynamic-groups": ["-f", "gptq", "-m", "gptq", "-g", "32", "--dynamic-groups", *CALIB],
    "awq": ["-f", "awq", "-g", "32"],
    "nf4": ["-m", "nf4", "-f", "bitsandbytes"],
    "fp4-double-quant": ["-m", "fp4", "--double-quant", "-f", "bitsandbytes"],
    "llm-int8": ["-m", "llm_int8", "-f", "bitsandbytes", *CALIB],
    "exl2": ["-m", "exl2", "-b", "4", "-g", "32", "-f", "exl2", *CALIB],
    "gguf-q4-k-m": ["--type", "Q4_K_M"],
}
FOREIGN = ("gptq-symmetric-3bit", "exl2", "nf4", "ct-zero-point-g32")  # without a manifest


@pytest.fixture(scope="module")
def artifacts(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    from quantbench.cli import main

    root = tmp_path_factory.mktemp("inspect-headers")
    found = {"hf-checkpoint": tiny_llama}
    for name, args in ARTIFACTS.items():
        main(["convert", str(tiny_llama), "-o", str(root / name), *args])
        found[name] = root / name
    for name in FOREIGN:  # as another tool would have written it
        copy = Path(shutil.copytree(root / name, root / f"{name}-foreign"))
        (copy / "quantbench.json").unlink()
        found[f"{name}-foreign"] = copy
    # a "sym" GPTQ file whose zero points are not all 2^(b-1): decoded on a zero-point grid
    odd = Path(shutil.copytree(root / "gptq-zero-point", root / "gptq-sym-flag-odd-zeros"))
    (odd / "quantbench.json").unlink()
    config = json.loads((odd / "config.json").read_text())
    config["quantization_config"].update(sym=True, checkpoint_format="gptq", format="gptq")
    (odd / "config.json").write_text(json.dumps(config))
    found[odd.name] = odd
    (root / "bare").mkdir()
    found["bare-gguf"] = Path(shutil.copy(root / "gguf-q4-k-m" / "model.gguf",
                                          root / "bare" / "theirs.gguf"))
    return found


def reader_description(path: Path) -> dict[str, Any]:
    """The oracle: every quantized tensor decoded by its format's reader, every plain tensor
    read (what ``inspect`` did before it read headers)."""
    from quantbench.formats.io import open_artifact

    art = open_artifact(path)
    tensors, q_weights, q_bits, plain_weights, plain_bits = [], 0, 0, 0, 0
    for name in art.quantized_names:
        qt = art.quantized(name)
        bits = qt.storage_bits()
        q_weights, q_bits = q_weights + qt.numel, q_bits + bits
        dtype = "exl2" if qt.grid.kind == "exl2" else getattr(qt.grid, "codebook",
                                                               f"int{qt.grid.bits}")
        tensors.append({"name": name, "shape": list(qt.shape), "dtype": dtype,
                        "grid": qt.grid.describe(), "bits_per_weight": round(bits / qt.numel, 4)})
    for name in art.plain_names:
        t = art.weights.get(name)
        plain_weights += t.numel()
        plain_bits += t.numel() * t.element_size() * 8
        tensors.append({"name": name, "shape": list(t.shape),
                        "dtype": str(t.dtype).replace("torch.", ""), "grid": None,
                        "bits_per_weight": t.element_size() * 8})
    manifest, total = art.manifest or {}, q_weights + plain_weights
    return {
        "path": str(path), "format": art.format, "architecture": art.config.get("model_type"),
        "quantization_config": art.config.get("quantization_config"),
        "quantize": manifest.get("quantize"), "source": manifest.get("source"),
        "eval": manifest.get("eval"), "experts": manifest.get("experts"),
        "size_bytes": art.size_bytes(), "weights": total,
        "quantized_weights": q_weights,
        "bits_per_weight_quantized": round(q_bits / q_weights, 4) if q_weights else None,
        "bits_per_weight": round((q_bits + plain_bits) / total, 4) if total else None,
        "tensors": tensors,
    }


def test_inspect_from_headers_equals_decoding_every_tensor(artifacts):
    from quantbench.formats.inspect import inspect_artifact

    for name, path in artifacts.items():
        got = inspect_artifact(path)
        files_ok = got.pop("files_ok")
        assert got == reader_description(path), name
        ours = (path / "quantbench.json").is_file() or (path.parent / "quantbench.json").is_file()
        assert files_ok is (True if ours else None), name
    assert {a["format"] for a in map(reader_description, artifacts.values())} == {
        "dense", "compressed-tensors", "gptq", "awq", "bitsandbytes", "exl2", "gguf"}


def test_a_grid_the_headers_contradict_is_refused_as_decoding_refuses_it(artifacts, tmp_path):
    """The summary is held to the decode's checks: scales for another group count (a config
    edited to another group size) are refused by both, naming the module."""
    from quantbench.errors import FormatError
    from quantbench.formats.io import open_artifact

    art = Path(shutil.copytree(artifacts["ct-zero-point-g32-foreign"], tmp_path / "edited"))
    config = json.loads((art / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 16
    (art / "config.json").write_text(json.dumps(config))
    name = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(FormatError, match="scales have 2 groups, grid .* needs 4") as decoded:
        open_artifact(art).quantized(name)
    with pytest.raises(FormatError, match="scales have 2 groups, grid .* needs 4") as summarized:
        open_artifact(art, headers_only=True).summary(name)
    assert str(decoded.value) == str(summarized.value)


GGUF_VARIANTS = {  # transformers config class, model class, config changes
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", {}),  # rope_freqs added to the file
    "yarn": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
        "beta_slow": 1.0, "original_max_position_embeddings": 128}}),
}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 128}


def _with_rope_freqs(file: Path, out: Path) -> Path:
    """``file`` written again by gguf-py with llama3 RoPE scaling's rope_freqs tensor (what
    llama.cpp's converter writes; quantbench's writer does not yet)."""
    import numpy as np

    from quantbench.formats.gguf_meta import rope_freqs
    from tests.conftest import rewrite_gguf

    freqs = rope_freqs({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                        "rope_parameters": LLAMA3}).numpy().astype(np.float32)
    return rewrite_gguf(file, out, extra={"rope_freqs.weight": freqs})


@pytest.mark.parametrize("variant", sorted(GGUF_VARIANTS))
def test_a_gguf_s_header_config_is_the_config_class_s(variant, tmp_path):
    """For a GGUF, inspect builds no transformers config (it imports torch): the keys it takes
    from the metadata are those the config class gives, and the description is the reader's
    (llama3 RoPE: read back from the rope_freqs tensor)."""
    import torch
    import transformers

    from quantbench.cli import main
    from quantbench.formats.gguf_check import HeaderReader, check_gguf
    from quantbench.formats.inspect import inspect_artifact
    from quantbench.models.gguf_import import _open, hf_config_from_gguf
    from tests.conftest import TINY_VOCAB, make_tokenizer

    config_cls, model_cls, changes = GGUF_VARIANTS[variant]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=0, eos_token_id=1, **changes)
    getattr(transformers, model_cls)(config).to(torch.float16).save_pretrained(tmp_path / "src")
    make_tokenizer(tmp_path / "src")
    main(["convert", str(tmp_path / "src"), "-o", str(tmp_path / "gguf"), "--type", "Q8_0"])
    file = tmp_path / "gguf" / "model.gguf"
    if variant == "llama3-rope":
        file = _with_rope_freqs(file, tmp_path / "llama3.gguf")
    full = hf_config_from_gguf(_open(file))
    header = hf_config_from_gguf(HeaderReader(file, check_gguf(file, ValueError)), full=False)
    for key, value in header.items():
        assert full.get(key) == value or key == "rope_theta" and full["rope_parameters"][
            "rope_theta"] == value, key  # (transformers keeps the base in rope_parameters)
    if variant == "llama3-rope":
        assert header["rope_parameters"]["rope_type"] == "llama3"
    got = inspect_artifact(file)
    got.pop("files_ok")
    assert got == reader_description(file)
