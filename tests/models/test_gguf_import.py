import json

import numpy as np
import pytest
import torch

from quantbench.errors import ModelLoadError
from quantbench.models.gguf_import import convert_gguf_to_hf, hf_name, permute_qk, unpermute_qk


@pytest.mark.parametrize("heads", [1, 3, 9])
def test_unpermute_inverts_permute(heads):
    w = torch.randn(heads * 8, 5)
    p = permute_qk(w, heads)
    assert not torch.equal(p, w)
    assert torch.equal(unpermute_qk(p, heads), w)
    # llama.cpp: new row h*hd + 2i + j is old row h*hd + j*(hd/2) + i
    hd, h = 8, heads - 1
    assert torch.equal(p[h * hd + 2 * 1 + 1], w[h * hd + 1 * (hd // 2) + 1])


def test_names():
    assert hf_name("blk.3.attn_output.weight") == "model.layers.3.self_attn.o_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    with pytest.raises(ModelLoadError):
        hf_name("blk.0.mystery.weight")


def _write_gguf(path, arch="llama"):
    import gguf

    torch.manual_seed(0)
    hidden, heads, kv, ff = 16, 4, 2, 32
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(10)
    hf = {
        "model.embed_tokens.weight": torch.randn(10, hidden),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(hidden, hidden),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(kv * 4, hidden),
        "model.layers.0.self_attn.v_proj.weight": torch.randn(kv * 4, hidden),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(hidden, hidden),
        "model.layers.0.mlp.gate_proj.weight": torch.randn(ff, hidden),
        "model.layers.0.mlp.up_proj.weight": torch.randn(ff, hidden),
        "model.layers.0.mlp.down_proj.weight": torch.randn(hidden, ff),
        "model.layers.0.input_layernorm.weight": torch.rand(hidden),
        "model.layers.0.post_attention_layernorm.weight": torch.rand(hidden),
        "model.norm.weight": torch.rand(hidden),
    }
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm"}
    for name, t in hf.items():
        data = t
        if "q_proj" in name:
            data = permute_qk(t, heads)
        elif "k_proj" in name:
            data = permute_qk(t, kv)
        module = name[: -len(".weight")]
        if module in names:
            gname = names[module]
        else:
            from quantbench.models.gguf_import import BLOCK_NAMES

            short = module.split(".", 3)[3]
            gname = "blk.0." + {v: k for k, v in BLOCK_NAMES.items()}[short]
        w.add_tensor(f"{gname}.weight", data.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_synthetic_gguf_converts_back(tmp_path):
    from safetensors.torch import load_file

    hf = _write_gguf(tmp_path / "m.gguf")
    info = convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "out", dtype=torch.float32,
                              tokenizer=False)
    assert info["gguf_types"] == {"F32": len(hf)}
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, t in hf.items():
        assert torch.equal(got[name], t), name
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["num_key_value_heads"] == 2


def test_unsupported_gguf_architecture(tmp_path):
    _write_gguf(tmp_path / "m.gguf", arch="falcon")
    with pytest.raises(ModelLoadError, match="'falcon' is not supported"):
        convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "out", tokenizer=False)


def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        convert_gguf_to_hf(tmp_path / "x.gguf", tmp_path / "out", tokenizer=False)


@pytest.mark.parametrize("factor,low,high,ctx", [(8.0, 1.0, 4.0, 8192),    # Llama 3.1
                                                 (32.0, 1.0, 4.0, 8192),   # Llama 3.2
                                                 (4.0, 1.0, 2.0, 2048),
                                                 (16.0, 2.0, 8.0, 4096)])
def test_llama3_rope_recovered_from_rope_freqs(factor, low, high, ctx):
    """llama.cpp keeps llama3 RoPE scaling only as the rope_freqs tensor: the parameters read
    back regenerate it exactly (the common Llama 3.x values come back as they were)."""
    from quantbench.formats.gguf_meta import rope_freqs
    from quantbench.models.gguf_import import llama3_rope

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor,
            "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": ctx}
    config = {"model_type": "llama", "head_dim": 128, "rope_parameters": rope}
    freqs = rope_freqs(config).numpy()
    got = llama3_rope(freqs, 500000.0, 128)
    np.testing.assert_allclose(rope_freqs({**config, "rope_parameters": got}).numpy(), freqs,
                               rtol=1e-6)
    if (low, high) == (1.0, 4.0):
        assert got == rope


def test_rope_freqs_that_are_not_llama3_are_refused():
    from quantbench.models.gguf_import import llama3_rope

    freqs = np.linspace(1.0, 3.0, 64).astype(np.float32) ** 2  # no llama3 band shape
    with pytest.raises(ModelLoadError, match="does not match llama3 RoPE"):
        llama3_rope(freqs, 10000.0, 128)
