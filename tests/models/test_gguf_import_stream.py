"""GGUF → HF import streams tensor by tensor (``models/safetensors_writer.py``): the file is
byte-identical to ``safetensors.torch.save_file`` of the whole dict, large models are sharded
as transformers shards them, a tensor missing or unlike its declaration is refused, and the
tensor memory held does not grow with the number of layers."""
from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from quantbench.errors import ModelLoadError
from quantbench.models import gguf_import, safetensors_writer
from quantbench.models.gguf_import import convert_gguf_to_hf
from quantbench.models.safetensors_header import check_header
from quantbench.models.safetensors_writer import SafetensorsWriter
from tests.conftest import rewrite_gguf
from tests.models.test_gguf_import import _write_gguf

DTYPES = [torch.uint64, torch.int64, torch.float64, torch.float32, torch.uint32, torch.int32,
          torch.bfloat16, torch.float16, torch.uint16, torch.int16, torch.float8_e4m3fn,
          torch.float8_e5m2, torch.int8, torch.uint8, torch.bool]


def _mixed() -> dict[str, torch.Tensor]:
    """Every dtype safetensors has a code for, names out of order, a scalar, an empty tensor."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPES):
        top = 2 if dtype == torch.bool else 256
        raw = torch.randint(0, top, (3 + i, (1 + i % 3) * dtype.itemsize), dtype=torch.uint8,
                            generator=g)
        out[f"t.{(i * 7) % len(DTYPES)}.{dtype}"] = raw.view(dtype)
    out.update({"scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4, dtype=torch.float16),
                "a.same": torch.ones(2, dtype=torch.float16), "b.same": torch.ones(2),
                "naïve.\"quoted\"": torch.ones(1)})  # as serde_json writes them
    return out


def _declared(tensors: dict[str, torch.Tensor]) -> list:
    return [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]


def test_writer_is_byte_identical_to_save_file(tmp_path):
    tensors = _mixed()
    save_file(tensors, str(tmp_path / "want.safetensors"), {"format": "pt"})
    (tmp_path / "out").mkdir()
    with SafetensorsWriter(tmp_path / "out", _declared(tensors)) as writer:
        for name in reversed(list(tensors)):  # in another order than the file's
            writer.write(name, tensors[name])
    assert writer.files == ["model.safetensors"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
        (tmp_path / "want.safetensors").read_bytes()


def _old_import(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What ``convert_gguf_to_hf`` held before streaming: every tensor, under its stored
    name, in the order the reader yields them."""
    from quantbench.models.arch import arch_of

    reader = gguf_import._open(path)
    config = gguf_import.hf_config_from_gguf(reader)
    spec = arch_of(config)
    return {spec.output_name(name): w.to(dtype).contiguous()
            for name, w, _ in gguf_import.read_gguf_tensors(reader, config)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_import_is_byte_identical_to_save_file(dtype, tmp_path):
    _write_gguf(tmp_path / "m.gguf")
    convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "out", dtype=dtype, tokenizer=False)
    save_file(_old_import(tmp_path / "m.gguf", dtype), str(tmp_path / "want.safetensors"),
              {"format": "pt"})
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == \
        ["model.safetensors"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
        (tmp_path / "want.safetensors").read_bytes()


def test_moe_import_is_byte_identical_to_save_file(tmp_path):
    """Mixtral: stacked ``ffn_*_exps`` split per expert, stored as ``block_sparse_moe``."""
    from tests.formats.test_gguf_moe import ours
    from tests.models.moe_tiny import make_tiny_moe

    src = make_tiny_moe("mixtral", tmp_path / "src")
    gguf_file = ours(src, "Q8_0", tmp_path / "q")
    convert_gguf_to_hf(gguf_file, tmp_path / "out", tokenizer=False)
    want = _old_import(gguf_file, torch.float16)
    assert any(".block_sparse_moe.experts.5." in name for name in want)
    save_file(want, str(tmp_path / "want.safetensors"), {"format": "pt"})
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
        (tmp_path / "want.safetensors").read_bytes()


def test_shards_are_what_transformers_writes(tmp_path):
    """Shards grouped as huggingface_hub groups a state dict (a tensor over the limit alone,
    where it comes), each byte-identical to ``save_file`` of its tensors; the index as
    ``save_pretrained`` writes it."""
    from huggingface_hub import split_torch_state_dict_into_shards

    tensors = _mixed()
    tensors = {"big": torch.zeros(64), **tensors, "big2": torch.zeros(70)}  # over the limit
    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern="model{suffix}.safetensors", max_shard_size=200)
    with SafetensorsWriter(tmp_path, _declared(tensors), max_shard_bytes=200) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
    assert writer.files == list(split.filename_to_tensors)
    for fname, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, str(tmp_path / "want"), {"format": "pt"})
        assert (tmp_path / fname).read_bytes() == (tmp_path / "want").read_bytes(), fname
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    numel = sum(t.numel() for t in tensors.values())
    assert index == {"metadata": {"total_parameters": numel, **split.metadata},
                     "weight_map": split.tensor_to_filename}


def test_sharded_import_loads_back(tmp_path, monkeypatch):
    from quantbench.models.loader import load_model

    _write_gguf(tmp_path / "m.gguf")
    convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "one", tokenizer=False)
    monkeypatch.setattr(safetensors_writer, "MAX_SHARD_BYTES", 1500)
    convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "out", tokenizer=False)
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "out" / "model.safetensors").exists()
    want = load_file(str(tmp_path / "one" / "model.safetensors"))
    model = load_model(tmp_path / "out")
    assert sorted(model.weights.names()) == sorted(want)
    for name, t in want.items():
        assert torch.equal(model.weights.get(name), t), name


def _fill(writer: SafetensorsWriter, tensors: dict[str, torch.Tensor], skip: str = "") -> None:
    for name, t in tensors.items():
        if name != skip:
            writer.write(name, t)


@pytest.mark.parametrize("name,bad,match", [
    ("b.same", torch.ones(2, dtype=torch.float16), "is F16 \\[2\\], but was declared F32"),
    ("b.same", torch.ones(3), "is F32 \\[3\\], but was declared F32 \\[2\\]"),
    ("c.other", torch.ones(2), "was not declared"),
    ("scalar", torch.tensor(2.0), "written twice")])
def test_writer_refuses_what_was_not_declared(name, bad, match, tmp_path):
    tensors = _mixed()
    with pytest.raises(ValueError, match=match):
        with SafetensorsWriter(tmp_path, _declared(tensors)) as writer:
            writer.write("scalar", tensors["scalar"])
            writer.write(name, bad)
    assert list(tmp_path.iterdir()) == []  # the failed file is removed


def test_missing_tensor_leaves_no_checkpoint(tmp_path):
    tensors = _mixed()
    writer = SafetensorsWriter(tmp_path, _declared(tensors), max_shard_bytes=200)
    _fill(writer, tensors, skip="empty")
    assert len(writer.files) > 1
    for path in tmp_path.glob("*.safetensors"):  # not closed yet: no reader takes it
        with pytest.raises(ModelLoadError, match="not valid JSON"):
            check_header(path)
    with pytest.raises(ValueError, match="1 declared tensor\\(s\\) never written, empty"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_import_refuses_a_tensor_missing_or_unlike_its_declaration(tmp_path, monkeypatch):
    """A reader that skips a tensor, or yields one of another shape, fails the import and
    leaves no weights file."""
    real = gguf_import.read_gguf_tensors
    _write_gguf(tmp_path / "m.gguf")
    monkeypatch.setattr(gguf_import, "read_gguf_tensors", lambda r, c: (
        item for item in real(r, c) if "o_proj" not in item[0]))
    with pytest.raises(ValueError, match="never written, model.layers.0.self_attn.o_proj"):
        convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "a", tokenizer=False)
    assert not list((tmp_path / "a").glob("*.safetensors"))
    monkeypatch.setattr(gguf_import, "read_gguf_tensors", lambda r, c: (
        (n, w.t() if "k_proj" in n else w, k) for n, w, k in real(r, c)))
    with pytest.raises(ValueError, match="k_proj.weight is F16 \\[16, 8\\], but was declared "
                                         "F16 \\[8, 16\\]"):
        convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "b", tokenizer=False)
    assert not list((tmp_path / "b").glob("*.safetensors"))


def _live_tensor_bytes() -> int:
    """Bytes of every CPU tensor storage alive in this process (each storage once)."""
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu" \
                and obj.layout == torch.strided:
            try:  # a fake or functional tensor left by another test has no data
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            except RuntimeError:
                continue
    return sum(storages.values())


def _many_layers(path: Path, layers: int) -> Path:
    """``_write_gguf``'s one-layer model with ``layers`` blocks (copies of block 0)."""
    import gguf

    _write_gguf(path.with_suffix(".one.gguf"))
    block = {t.name: np.array(t.data) for t in
             gguf.GGUFReader(str(path.with_suffix(".one.gguf"))).tensors
             if t.name.startswith("blk.0.")}
    extra = {name.replace("blk.0.", f"blk.{i}."): data * (i + 1)
             for i in range(1, layers) for name, data in block.items()}
    return rewrite_gguf(path.with_suffix(".one.gguf"), path, extra=extra,
                        kvs={"llama.block_count": layers})


def _import_peak(path: Path, out: Path, monkeypatch) -> int:
    """The most tensor bytes alive (over those alive before) after each tensor the reader
    yields was taken by the import."""
    real = gguf_import.read_gguf_tensors
    peaks = []

    def metered(reader, config):
        for item in real(reader, config):
            yield item
            peaks.append(_live_tensor_bytes() - base)

    monkeypatch.setattr(gguf_import, "read_gguf_tensors", metered)
    gc.collect()
    base = _live_tensor_bytes()
    convert_gguf_to_hf(path, out, tokenizer=False)
    monkeypatch.undo()
    return max(peaks)


def test_import_memory_does_not_grow_with_layers(tmp_path, monkeypatch):
    """The tensors alive while importing 8 layers are no more than while importing 1: about
    one tensor (the one just written, and the one it was computed from), not the model."""
    few = _import_peak(_many_layers(tmp_path / "few.gguf", 1), tmp_path / "few", monkeypatch)
    many = _import_peak(_many_layers(tmp_path / "many.gguf", 8), tmp_path / "many",
                        monkeypatch)
    written = load_file(str(tmp_path / "many" / "model.safetensors"))
    assert len(written) == 2 + 8 * 9
    largest = max(t.numel() for t in written.values()) * 4  # as float32, as dequantized
    model = sum(t.numel() * t.element_size() for t in written.values())
    assert model > 5 * 3 * largest  # what holding every tensor would show
    assert many <= 3 * largest, (many, largest)
    assert many <= few + largest, (many, few)
