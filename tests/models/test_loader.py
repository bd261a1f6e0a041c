import json

import pytest
import torch
from safetensors.torch import save_file

from quantbench.errors import ModelLoadError
from quantbench.models.loader import load_model
from tests.conftest import make_tiny_llama


def test_single_file_checkpoint(tiny_llama):
    model = load_model(tiny_llama)
    assert model.arch.family == "llama"
    assert model.num_blocks == 2
    assert model.dtype == torch.float16
    assert not model.tied_embeddings
    blocks = dict(model.iter_blocks())
    assert "model.layers.1.mlp.down_proj.weight" in blocks[1]
    assert all(model.arch.block_of(n) == 0 for n in blocks[0])
    assert "lm_head.weight" in model.other_tensor_names()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_and_dtypes(tmp_path, dtype):
    path = make_tiny_llama(tmp_path / "m", dtype=dtype, shard_bytes=30_000, tokenizer=False)
    assert (path / "model.safetensors.index.json").is_file()
    model = load_model(path)
    assert len(model.weights.files()) > 1
    assert model.dtype == dtype
    assert model.weights.get("model.layers.1.self_attn.q_proj.weight").dtype == dtype


def test_tied_embeddings(tiny_llama_tied):
    model = load_model(tiny_llama_tied)
    assert model.tied_embeddings
    assert "lm_head.weight" not in model.weights


def test_bin_checkpoint_loaded_weights_only(tmp_path, tiny_llama, caplog):
    src = load_model(tiny_llama)
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text((tiny_llama / "config.json").read_text())
    torch.save({n: src.weights.get(n) for n in src.weights.names()}, d / "pytorch_model.bin")
    model = load_model(d)
    assert torch.equal(model.weights.get("model.norm.weight"), src.weights.get("model.norm.weight"))
    assert "weights_only=True" in caplog.text


def test_hostile_pickle_refused(tmp_path, tiny_llama):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    d = tmp_path / "evil"
    d.mkdir()
    (d / "config.json").write_text((tiny_llama / "config.json").read_text())
    torch.save({"x": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        load_model(d)


def test_missing_path():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("/no/such/dir")


def test_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_truncated_safetensors(tmp_path):
    path = make_tiny_llama(tmp_path / "m", tokenizer=False)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupted"):
        load_model(path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_bigcode"}))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt_bigcode'.*llama"):
        load_model(tmp_path)


def test_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_model("someorg/some-model-that-is-not-cached")


def test_block_description_fused_parts_and_attention_kinds():
    """Fused projections split into their logical rows from the config; each layer's
    attention kind comes from layer_types or the sliding-window setting."""
    import dataclasses

    from quantbench.errors import ModelLoadError
    from quantbench.models.arch import LLAMA, Fused

    qkv = Fused("self_attn.qkv_proj", (("q", "num_attention_heads*head_dim"),
                                       ("k", "num_key_value_heads*head_dim"),
                                       ("v", "num_key_value_heads*head_dim")))
    phi3_like = dataclasses.replace(LLAMA, fused=(qkv,))
    config = {"hidden_size": 3072, "num_attention_heads": 32, "num_key_value_heads": 8}
    rows = phi3_like.fused_parts("self_attn.qkv_proj").rows(config)
    assert rows == {"q": slice(0, 3072), "k": slice(3072, 3840), "v": slice(3840, 4608)}
    assert phi3_like.fused_parts("self_attn.o_proj") is None
    with pytest.raises(ModelLoadError, match="no 'num_attention_heads'"):
        qkv.rows({"hidden_size": 64})

    assert LLAMA.attention_kinds({}, 2) == ["full_attention"] * 2
    assert LLAMA.attention_kinds({"sliding_window": 4096}, 2) == ["sliding_attention"] * 2
    assert LLAMA.attention_kinds({"sliding_window": 8, "use_sliding_window": False}, 1) == \
        ["full_attention"]
    alternating = ["sliding_attention", "full_attention"]
    assert LLAMA.attention_kinds({"layer_types": alternating}, 2) == alternating
    with pytest.raises(ModelLoadError, match="lists 2 layers"):
        LLAMA.attention_kinds({"layer_types": alternating}, 3)
