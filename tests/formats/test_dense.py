import json

import pytest
import torch

from quantbench.api import quantize, save
from quantbench.errors import QuantbenchError
from quantbench.formats.io import ShardedWriter, open_artifact, write_artifact
from quantbench.formats.manifest import sha256_file, verify_files
from quantbench.models.torch_model import build_causal_lm


def test_dense_round_trip_bit_exact(write_tiny):
    w = write_tiny("dense", method="zeropoint", bits=4, group_size=32)
    model, q, out, art = w.model, w.q, w.out, w.art
    for name in q.targets:
        expect = w.rtn_reference(name)
        got = art.weights.get(name)
        assert got.dtype == torch.float16
        assert torch.equal(got, expect.dequantize(torch.float16))
    assert torch.equal(art.weights.get("lm_head.weight"), model.weights.get("lm_head.weight"))
    manifest = json.loads((out / "quantbench.json").read_text())
    assert manifest["format"] == "dense"
    assert manifest["quantize"]["grid"]["bits"] == 4
    assert manifest["tensors"]["model.layers.0.mlp.up_proj.weight"]["bits"] == 4
    assert manifest["files"]["model.safetensors"]["sha256"] == sha256_file(out / "model.safetensors")
    assert verify_files(out / "quantbench.json", manifest) == []
    assert (out / "tokenizer.json").is_file() and "quantization_config" not in json.loads(
        (out / "config.json").read_text())


def test_dense_loads_in_plain_transformers(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    q = quantize(str(tiny_llama), method="absmax", bits=4, group_size=32)
    out = save(q, tmp_path / "dense", format="dense")
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    art = open_artifact(out)
    ours = build_causal_lm(art.config, art.dequantized(), torch.float32)
    ids = torch.randint(0, 300, (1, 24))
    with torch.inference_mode():
        assert torch.allclose(hf(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)


def test_sharded_writer_streams_shards(tmp_path):
    w = ShardedWriter(tmp_path, max_shard_bytes=1000)
    for i in range(5):
        w.add(f"t{i}", torch.zeros(100, dtype=torch.float32))  # 400 B each
    names = w.close()
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {f"t{i}" for i in range(5)}
    with pytest.raises(RuntimeError, match="closed"):
        w.add("t9", torch.zeros(1))
    (tmp_path / "x").mkdir()
    fresh = ShardedWriter(tmp_path / "x")
    fresh.add("a", torch.zeros(1))
    with pytest.raises(ValueError, match="twice"):
        fresh.add("a", torch.zeros(1))


def test_sharded_writer_files_equal_what_safetensors_reads(tmp_path):
    """Streamed shards are valid safetensors: every dtype, odd shapes, 0-d and empty tensors,
    non-contiguous inputs and metadata come back exactly through safetensors' own reader."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "i32": torch.randint(-9, 9, (4, 4), generator=g, dtype=torch.int32),
        "u8": torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8),
        "i64_scalar": torch.tensor(7),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(4, 6, generator=g).t(),
    }
    w = ShardedWriter(tmp_path, max_shard_bytes=64, metadata={"note": "x"})
    for name, t in tensors.items():
        w.add(name, t)
    names = w.close()
    assert len(names) > 1 and not list(tmp_path.glob("shard-*"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    for name, t in tensors.items():
        with safe_open(str(tmp_path / index["weight_map"][name]), "pt") as fh:
            assert fh.metadata() == {"format": "pt", "note": "x"}
            got = fh.get_tensor(name)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name


def test_failure_leaves_nothing_behind(tiny_llama, tmp_path):
    q = quantize(str(tiny_llama), method="absmax", bits=4, group_size=32)

    def boom(label):
        if label == "block 1":
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_artifact(q, tmp_path / "out", "dense", on_step=boom)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tiny_llama, tmp_path):
    q = quantize(str(tiny_llama), method="absmax", bits=8, group_size=-1)
    out = save(q, tmp_path / "o")
    with pytest.raises(QuantbenchError, match="--overwrite"):
        save(q, out)
    save(q, out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_lazy_weights_read_without_mmap_equal_safetensors(tmp_path):
    """LazyWeights reads tensors with plain file reads; they equal safetensors' own."""
    from safetensors.torch import load_file, save_file

    from quantbench.models.weights import LazyWeights

    g = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(5, 3, generator=g).bfloat16(), "b": torch.tensor(3),
               "c": torch.randint(0, 9, (7,), generator=g, dtype=torch.uint8),
               "d": torch.zeros(0, 2).half(),
               "e": torch.randn(4, generator=g).to(torch.float8_e4m3fn)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    lazy = LazyWeights.from_dir(tmp_path)
    ref = load_file(str(tmp_path / "model.safetensors"))
    for name in tensors:
        got = lazy.get(name)
        assert got.dtype == ref[name].dtype and got.shape == ref[name].shape
        as_bytes = [t.reshape(-1).view(torch.uint8) for t in (got, ref[name])]
        assert torch.equal(*as_bytes), name
    raw = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[:-4])  # truncated after opening
    with pytest.raises(QuantbenchError, match="truncated"):
        LazyWeights.from_dir(tmp_path).get("e")
