"""Class 1, Hugging Face checkpoints: a source is checked against its config before any work.

Every variant below damages a fresh tiny llama on one side (config or weights) and must be
refused in one line naming the first disagreement (tensor, shapes, config key), with nothing
written. Harmless leftovers (rotary ``inv_freq`` buffers, an lm_head copy of tied embeddings)
are accepted.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.faults.conftest import assert_no_leftovers, assert_refused

ST = "model.safetensors"
L0, L1 = "model.layers.0.", "model.layers.1."


def edit_config(src: Path, drop: tuple[str, ...] = (), **changes) -> None:
    config = json.loads((src / "config.json").read_text())
    for key in drop:
        config.pop(key)
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))


def edit_weights(src: Path, fn) -> None:
    tensors = load_file(str(src / ST))
    fn(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(src / ST), {"format": "pt"})


def _drop_layer(t: dict) -> None:
    for name in [n for n in t if n.startswith(L1)]:
        del t[name]


def _add_layer(t: dict) -> None:
    for name in [n for n in t if n.startswith(L1)]:
        t[name.replace(L1, "model.layers.2.")] = t[name].clone()


def _reshape(name: str, shape: tuple[int, ...]):
    def fn(t: dict) -> None:
        t[name] = t[name].reshape(shape).clone()
    return fn


def _rename(old: str, new: str):
    def fn(t: dict) -> None:
        t[new] = t.pop(old)
    return fn


def _add(name: str, shape: tuple[int, ...]):
    def fn(t: dict) -> None:
        t[name] = torch.zeros(shape, dtype=torch.float16)
    return fn


def _remove(name: str):
    def fn(t: dict) -> None:
        del t[name]
    return fn


# (config changes, config keys to drop, weights edit, needles of the refusal)
MISMATCHES = {
    "config-more-layers": ({"num_hidden_layers": 3}, (), None,
                           ["num_hidden_layers is 3", "hold 2 layers"]),
    "config-fewer-layers": ({"num_hidden_layers": 1}, (), None,
                            ["hold 2 layers", "num_hidden_layers is 1"]),
    "weights-fewer-layers": ({}, (), _drop_layer, ["num_hidden_layers is 2", "hold 1 layers"]),
    "weights-more-layers": ({}, (), _add_layer, ["hold 3 layers", "num_hidden_layers is 2"]),
    "hidden": ({"hidden_size": 48}, (), None,
               ["model.embed_tokens.weight", "[320, 64]", "[320, 48]", "hidden_size"]),
    "heads": ({"num_attention_heads": 8}, (), None,
              [L0 + "self_attn.q_proj.weight", "[128, 64]", "num_attention_heads"]),
    "kv-heads": ({"num_key_value_heads": 4}, (), None,
                 [L0 + "self_attn.k_proj.weight", "[32, 64]", "[64, 64]", "num_key_value_heads"]),
    "kv-heads-not-dividing": ({"num_key_value_heads": 3}, (), None,
                              ["num_attention_heads=4", "num_key_value_heads=3", "multiple"]),
    "head-dim": ({"head_dim": 8}, (), None,
                 [L0 + "self_attn.q_proj.weight", "[32, 64]", "num_attention_heads*head_dim=4*8"]),
    "intermediate": ({"intermediate_size": 96}, (), None,
                     [L0 + "mlp.gate_proj.weight", "[128, 64]", "[96, 64]",
                      "intermediate_size"]),
    "vocab": ({"vocab_size": 321}, (), None, ["model.embed_tokens.weight", "vocab_size=321"]),
    "same-bytes-reshape": ({}, (), _reshape(L1 + "self_attn.k_proj.weight", (64, 32)),
                           [L1 + "self_attn.k_proj.weight", "[64, 32]", "[32, 64]"]),
    "same-bytes-transpose": ({}, (), _reshape(L0 + "mlp.down_proj.weight", (128, 64)),
                             [L0 + "mlp.down_proj.weight", "[128, 64]", "[64, 128]"]),
    "norm-reshaped": ({}, (), _reshape("model.norm.weight", (8, 8)),
                      ["model.norm.weight", "[8, 8]", "[64]"]),
    "tensor-removed": ({}, (), _remove(L1 + "self_attn.v_proj.weight"),
                       [L1 + "self_attn.v_proj.weight", "missing"]),
    "tensor-renamed": ({}, (), _rename(L0 + "mlp.up_proj.weight", L0 + "mlp.upper.weight"),
                       [L0 + "mlp.up_proj.weight", "missing"]),
    "tensor-added": ({}, (), _add(L0 + "self_attn.extra.weight", (4, 4)),
                     [L0 + "self_attn.extra.weight", "not part of a llama model"]),
    "bias-without-flag": ({}, (), _add(L0 + "self_attn.q_proj.bias", (64,)),
                          [L0 + "self_attn.q_proj.bias", "attention_bias is False"]),
    "flag-without-bias": ({"attention_bias": True}, (), None,
                          [L0 + "self_attn.q_proj.bias", "missing", "attention_bias"]),
    "other-family": ({"model_type": "qwen2"}, (), None,
                     [L0 + "self_attn.q_proj.bias", "missing"]),
    "tied-config-untied-weights": ({"tie_word_embeddings": True}, (), None,
                                   ["lm_head.weight", "tie_word_embeddings"]),
    "untied-config-no-lm-head": ({}, (), _remove("lm_head.weight"),
                                 ["lm_head.weight", "missing", "tie_word_embeddings is false"]),
    "no-lm-head-default-untied": ({}, ("tie_word_embeddings",), _remove("lm_head.weight"),
                                  ["lm_head.weight", "missing"]),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_config_and_weights_disagreeing_are_refused(case, qb, fresh_llama, tmp_path):
    changes, drop, weights_edit, needles = MISMATCHES[case]
    src = fresh_llama()
    edit_config(src, drop, **changes)
    if weights_edit:
        edit_weights(src, weights_edit)
    out = tmp_path / "outputs"
    assert_refused(qb("convert", src, "-o", out / "q"), *needles)
    assert_no_leftovers(out)


@pytest.mark.parametrize("key", ["num_hidden_layers", "hidden_size", "intermediate_size",
                                 "vocab_size", "num_attention_heads"])
def test_missing_config_key_is_named(key, qb, fresh_llama, tmp_path):
    src = fresh_llama()
    edit_config(src, drop=(key,))
    assert_refused(qb("convert", src, "-o", tmp_path / "q"), f"no '{key}'")
    assert_no_leftovers(tmp_path, keep=(src.name,))


@pytest.mark.parametrize("value", ["2", 0, -1, 2.5, True, None, [2]])
def test_config_key_that_is_not_a_positive_int(value, qb, fresh_llama, tmp_path):
    src = fresh_llama()
    edit_config(src, num_hidden_layers=value)
    line = assert_refused(qb("convert", src, "-o", tmp_path / "q"), "num_hidden_layers")
    assert "positive integer" in line or "no 'num_hidden_layers'" in line


# scalar hyperparameters the forward and the writers read: a wrong kind is refused up front
# (a string epsilon used to be copied into the artifact, or fail mid-GGUF-write as "internal")
HYPERPARAMETERS = {
    "eps-string": ({"rms_norm_eps": "x"}, "--type", "rms_norm_eps"),
    "eps-negative": ({"rms_norm_eps": -1.0}, "-f", "rms_norm_eps"),
    "eps-zero": ({"rms_norm_eps": 0}, "--type", "rms_norm_eps"),
    "rope-string": ({"rope_parameters": {"rope_theta": "abc", "rope_type": "default"}}, "--type",
                    "rope_theta"),
    "context-string": ({"max_position_embeddings": "big"}, "--type", "max_position_embeddings"),
    "tie-string": ({"tie_word_embeddings": "false"}, "-f", "tie_word_embeddings"),
    "bias-number": ({"attention_bias": 1}, "-f", "attention_bias"),
}


@pytest.mark.parametrize("case", sorted(HYPERPARAMETERS))
def test_scalar_hyperparameter_of_the_wrong_kind_is_refused(case, qb, fresh_llama, tmp_path):
    changes, flag, needle = HYPERPARAMETERS[case]
    src = fresh_llama()
    edit_config(src, **changes)
    how = ["--type", "Q8_0"] if flag == "--type" else ["-m", "absmax", "-g", 64]
    assert_refused(qb("convert", src, *how, "-o", tmp_path / "q"), needle, "config.json")
    assert_no_leftovers(tmp_path, keep=(src.name,))


def test_eval_of_a_mismatched_source_is_refused(qb, fresh_llama):
    src = fresh_llama()
    edit_config(src, intermediate_size=256)
    assert_refused(qb("eval", src, "--ctx", 64, "--max-tokens", 256, "--no-cache"),
                   "mlp.gate_proj.weight", "intermediate_size")


def test_api_load_model_refuses_too(fresh_llama):
    from quantbench import load_model
    from quantbench.errors import ModelLoadError

    src = fresh_llama()
    edit_weights(src, _drop_layer)
    with pytest.raises(ModelLoadError, match="hold 1 layers"):
        load_model(src)


def test_harmless_leftovers_are_accepted(qb, fresh_llama, tmp_path):
    """Rotary inv_freq buffers (older transformers saved them) and an lm_head equal to the
    tied embeddings are skipped, and the conversion succeeds without them."""
    from quantbench import load_model

    src = fresh_llama()
    edit_config(src, tie_word_embeddings=True)

    def leftovers(t: dict) -> None:
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        t["model.rotary_emb.inv_freq"] = torch.ones(8)
        t[L0 + "self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    edit_weights(src, leftovers)
    model = load_model(src)
    assert model.tied_embeddings and "lm_head.weight" not in model.weights
    assert not any("inv_freq" in n for n in model.weights.names())
    result = qb("convert", src, "-o", tmp_path / "q", "--group-size", 32)
    assert result.code == 0, result.stderr
    written = load_file(str(tmp_path / "q" / ST))
    assert "lm_head.weight" not in written and not any("inv_freq" in n for n in written)


def test_a_family_without_declared_shapes_still_loads(fresh_llama, monkeypatch):
    """An architecture whose shapes are not declared needs its tensors present, nothing more."""
    import dataclasses

    from quantbench.errors import ModelLoadError
    from quantbench.models import arch as arch_module
    from quantbench.models.loader import load_model

    bare = dataclasses.replace(arch_module.LLAMA, family="bare", model_types=("bare-test",),
                               shapes=())
    monkeypatch.setattr(arch_module, "ARCHITECTURES", (*arch_module.ARCHITECTURES, bare))
    src = fresh_llama()
    edit_config(src, model_type="bare-test")
    edit_weights(src, _reshape(L1 + "self_attn.k_proj.weight", (64, 32)))
    assert load_model(src).weights.shape(L1 + "self_attn.k_proj.weight") == (64, 32)
    edit_weights(src, _remove(L1 + "self_attn.k_proj.weight"))
    with pytest.raises(ModelLoadError, match="k_proj.weight is missing"):
        load_model(src)


# -- safetensors headers -------------------------------------------------------------------


def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


def _forge(fn):
    def apply(path: Path) -> None:
        header, data = _split(path)
        path.write_bytes(fn(header, data))
    return apply


def _entry(header: dict, index: int) -> tuple[str, dict]:
    """The header entry with the ``index``-th smallest data offset."""
    names = sorted((n for n in header if n != "__metadata__"),
                   key=lambda n: header[n]["data_offsets"][0])
    return names[index], header[names[index]]


def _overlap(header, data):
    (_, first), (name, second) = _entry(header, 0), _entry(header, 1)
    second["data_offsets"] = [first["data_offsets"][0],
                              first["data_offsets"][0] + second["data_offsets"][1]
                              - second["data_offsets"][0]]
    return _join(header, data)


def _past_end(header, data):
    name, entry = _entry(header, -1)
    size = entry["data_offsets"][1] - entry["data_offsets"][0]
    entry["data_offsets"] = [len(data), len(data) + size]
    return _join(header, data)


def _byte_count(header, data):
    name, entry = _entry(header, 2)
    entry["shape"] = [entry["shape"][0] + 1, *entry["shape"][1:]]
    return _join(header, data)


def _dtype(header, data):
    _entry(header, 3)[1]["dtype"] = "Q4"
    return _join(header, data)


def _not_json(header, data):
    raw = _join(header, data)
    return raw[:9] + b"\xff" + raw[10:]


def _huge_header(header, data):
    raw = _join(header, data)
    return struct.pack("<Q", 1 << 40) + raw[8:]


HEADERS = {  # (forge, needles)
    "overlap": (_overlap, ["overlaps"]),
    "past-end": (_past_end, ["runs past the end"]),
    "byte-count": (_byte_count, ["bytes of data but"]),
    "dtype": (_dtype, ["dtype 'Q4'"]),
    "not-json": (_not_json, ["not valid JSON"]),
    "header-length": (_huge_header, ["header length"]),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_forged_safetensors_headers_are_refused_naming_the_tensor(case, qb, fresh_llama,
                                                                  tmp_path):
    forge, needles = HEADERS[case]
    src = fresh_llama()
    header, _ = _split(src / ST)
    _forge(forge)(src / ST)
    line = assert_refused(qb("convert", src, "-o", tmp_path / "q"), ST, *needles)
    if case not in ("not-json", "header-length"):  # the forged entry is named
        assert any(f"tensor {name}" in line for name in header), line
    assert_no_leftovers(tmp_path, keep=(src.name,))


@pytest.mark.parametrize("keep", [0, 7, 8, 100, 0.5, -1])
def test_truncated_safetensors_at_several_offsets(keep, qb, fresh_llama, tmp_path):
    src = fresh_llama()
    raw = (src / ST).read_bytes()
    cut = int(len(raw) * keep) if isinstance(keep, float) else (
        len(raw) + keep if keep < 0 else keep)
    (src / ST).write_bytes(raw[:cut])
    assert_refused(qb("convert", src, "-o", tmp_path / "q"), ST)
    assert_no_leftovers(tmp_path, keep=(src.name,))


def test_sharded_checkpoint_missing_a_tensor_of_its_index(qb, tmp_path):
    """A sharded checkpoint whose index lists a tensor no shard holds."""
    from tests.conftest import make_tiny_llama

    src = make_tiny_llama(tmp_path / "sharded", shard_bytes=30_000, tokenizer=False)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"][L1 + "mlp.up_proj.weight"]
    tensors = load_file(str(shard))
    del tensors[L1 + "mlp.up_proj.weight"]
    save_file(tensors, str(shard), {"format": "pt"})
    assert_refused(qb("convert", src, "-o", tmp_path / "q"), "mlp.up_proj.weight")


def _two_shards(src: Path) -> tuple[list[str], list[str], dict]:
    """Split ``src``'s weights over two shards with an index; returns the names of each."""
    tensors = load_file(str(src / ST))
    (src / ST).unlink()
    names = sorted(tensors)
    first, second = names[:len(names) // 2], names[len(names) // 2:]
    files = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    for part, fname in zip((first, second), files):
        save_file({k: tensors[k] for k in part}, str(src / fname), {"format": "pt"})
    index = {"metadata": {}, "weight_map": {**{k: files[0] for k in first},
                                            **{k: files[1] for k in second}}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return first, second, index


def _copy_into_second(src: Path, first: list[str], second: list[str], scale: float) -> None:
    tensors = load_file(str(src / "model-00001-of-00002.safetensors"))
    extra = {first[0]: (tensors[first[0]] * scale).contiguous()}
    held = load_file(str(src / "model-00002-of-00002.safetensors"))
    save_file({**held, **extra}, str(src / "model-00002-of-00002.safetensors"), {"format": "pt"})


@pytest.mark.parametrize("case", ["same-values", "other-values", "no-index"])
def test_a_tensor_in_two_shards_is_refused(case, qb, fresh_llama, tmp_path):
    """Which copy is the model's cannot be told: never pick one silently."""
    src = fresh_llama()
    first, second, _ = _two_shards(src)
    _copy_into_second(src, first, second, 1.0 if case == "same-values" else 2.0)
    if case == "no-index":
        (src / "model.safetensors.index.json").unlink()
    assert_refused(qb("convert", src, "-m", "absmax", "-g", 64, "-o", tmp_path / "q"),
                   first[0], "in both", "model-00002-of-00002")
    assert_no_leftovers(tmp_path, keep=(src.name,))


def test_duplicated_key_in_a_safetensors_header(qb, fresh_llama, tmp_path):
    """``json`` keeps the last of two entries for one name: the file is refused instead."""
    src = fresh_llama()
    header, data = _split(src / ST)
    name = "model.norm.weight"
    blob = json.dumps(header).encode()
    blob = blob[:-1] + b', "' + name.encode() + b'": ' + json.dumps(header[name]).encode() + b"}"
    blob += b" " * (-len(blob) % 8)
    (src / ST).write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    assert_refused(qb("convert", src, "-o", tmp_path / "q"), name, "twice")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool, torch.uint8,
                                   torch.float8_e4m3fn])
def test_source_tensor_that_is_not_a_float(dtype, qb, fresh_llama, tmp_path):
    """Integer codes without a quantization_config would be read as weights."""
    name = L0 + "mlp.up_proj.weight"
    src = fresh_llama()
    edit_weights(src, lambda t: t.__setitem__(name, (t[name] * 50).to(dtype)))
    assert_refused(qb("convert", src, "--type", "Q8_0", "-o", tmp_path / "q"), name,
                   str(dtype).removeprefix("torch."), "floating-point")
    assert_no_leftovers(tmp_path, keep=(src.name,))


# -- quantized artifacts used as input: files against the manifest and the config ------------


@pytest.fixture(scope="module")
def gptq_artifact(tmp_path_factory) -> Path:
    from quantbench.cli import main
    from tests.conftest import make_tiny_llama

    root = tmp_path_factory.mktemp("artifact")
    src = make_tiny_llama(root / "src")
    try:
        main(["convert", str(src), "--format", "gptq", "--method", "absmax", "-g", 32,
              "-o", str(root / "q")])
    except SystemExit as exc:
        assert not exc.code
    return root / "q"


def _artifact_copy(artifact: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "art"
    shutil.copytree(artifact, dst)
    return dst


def _edit_manifest(art: Path, fn) -> None:
    manifest = json.loads((art / "quantbench.json").read_text())
    fn(manifest)
    (art / "quantbench.json").write_text(json.dumps(manifest))


def _rerecord(art: Path) -> None:
    """Checksums that agree with the damaged bytes, so the check under test is what fires."""
    from quantbench.formats.manifest import file_table

    _edit_manifest(art, lambda m: m.__setitem__("files", file_table(art)))


Q1 = L1 + "self_attn.q_proj"


def _drop_module(t: dict) -> None:
    for name in [n for n in t if n.startswith(Q1 + ".")]:
        del t[name]


def _add_module(t: dict) -> None:
    for name in [n for n in t if n.startswith(Q1 + ".")]:
        t[name.replace("q_proj", "q2_proj")] = t[name].clone()


ARTIFACT_DAMAGE = {  # (edit the weights, edit the manifest, edit the config, needles)
    "manifest-tensor-missing-from-files": (_drop_module, None, None,
                                           [Q1 + ".weight", "manifest lists"]),
    "unlisted-quantized-tensor": (_add_module, None, None,
                                  ["quantized tensor", "q2_proj.weight", "does not list"]),
    "unlisted-plain-tensor": (_add("model.extra.weight", (4,)), None, None,
                              ["model.extra.weight", "does not list"]),
    "plain-shape-differs": (None, lambda m: m["tensors"]["model.norm.weight"].__setitem__(
        "shape", [32]), None, ["model.norm.weight", "[64]", "[32]"]),
    "quantized-shape-differs": (None, lambda m: m["tensors"][Q1 + ".weight"].__setitem__(
        "shape", [32, 64]), None, [Q1 + ".weight", "[32, 64]"]),
    "config-more-layers": (None, None, {"num_hidden_layers": 3}, ["num_hidden_layers is 3"]),
    "config-other-kv-heads": (None, None, {"num_key_value_heads": 4},
                              ["k_proj.weight", "num_key_value_heads"]),
    "no-tensor-table": (None, lambda m: m.__setitem__("tensors", ["x"]), None,
                        ["'tensors' must be an object"]),
}


@pytest.mark.parametrize("case", sorted(ARTIFACT_DAMAGE))
def test_artifact_disagreeing_with_its_manifest_or_config(case, qb, gptq_artifact, tmp_path):
    weights_edit, manifest_edit, config_changes, needles = ARTIFACT_DAMAGE[case]
    art = _artifact_copy(gptq_artifact, tmp_path)
    if weights_edit:
        tensors = load_file(str(art / ST))
        weights_edit(tensors)
        save_file(tensors, str(art / ST), {"format": "pt"})
    if config_changes:
        edit_config(art, **config_changes)
    _rerecord(art)
    if manifest_edit:
        _edit_manifest(art, manifest_edit)
    assert_refused(qb("inspect", art), *needles)


def _settings(**changes):
    """Edit GPTQ's settings in both places a reader may take them from, consistently."""
    def edit(art: Path) -> None:
        q = json.loads((art / "quantize_config.json").read_text())
        q.update(changes)
        (art / "quantize_config.json").write_text(json.dumps(q))
        config = json.loads((art / "config.json").read_text())
        config["quantization_config"].update(changes)
        (art / "config.json").write_text(json.dumps(config))
    return edit


def _manifest_only(fn):
    return lambda art: _edit_manifest(art, fn)


EDITED_SETTINGS = {  # edited files re-hashed: only the artifact's own consistency can tell
    "bits-fewer": (_settings(bits=3), True, ["'bits' = 3, not 4", "quantbench.json records"]),
    "bits-more": (_settings(bits=8), True, ["'bits' = 8, not 4"]),
    "group-larger": (_settings(group_size=64), True, ["'group_size' = 64, not 32"]),
    "per-channel": (_settings(group_size=-1), True, ["'group_size' = -1, not 32"]),
    "manifest-bits": (_manifest_only(lambda m: m["quantize"]["grid"].__setitem__("bits", 3)),
                      False, ["'bits' = 4, not 3", "quantbench.json records"]),
    "sym-flipped": (_settings(sym=False), True, ["'sym' = False", "quantbench.json records"]),
    "desc-act-flipped": (_settings(desc_act=True), True, ["'desc_act' = True"]),
    "checkpoint-format-v2": (_settings(checkpoint_format="gptq_v2", format="gptq_v2"), True,
                             ["'checkpoint_format' = 'gptq_v2'"]),
    "settings-only-in-one-file": (lambda art: _settings(damp_percent=0.5)(art) or
                                  (art / "quantize_config.json").write_text(
                                      (art / "quantize_config.json").read_text()), True,
                                  ["'damp_percent' = 0.5"]),
    "manifest-quantized-flag": (_manifest_only(lambda m: m["tensors"][Q1 + ".weight"].__setitem__(
        "quantized", False)), False, [Q1 + ".weight", "stored quantized"]),
}


@pytest.mark.parametrize("case", sorted(EDITED_SETTINGS))
def test_artifact_settings_edited_and_rehashed(case, qb, gptq_artifact, tmp_path):
    """A quantization config that still decodes, but to another grid than the one written,
    is never scored silently; one that does not decode is one line, not an internal error."""
    edit, rehash, needles = EDITED_SETTINGS[case]
    art = _artifact_copy(gptq_artifact, tmp_path)
    edit(art)
    if rehash:
        _rerecord(art)
    assert_refused(qb("inspect", art), str(art), *needles)


def test_quantized_shape_mismatch_is_refused_before_scoring(qb, gptq_artifact, fresh_llama,
                                                            tmp_path):
    """A manifest shape the config contradicts: eval refuses before scoring, records nothing;
    and a quantized tensor that decodes to another shape than expected is refused on use."""
    from quantbench.errors import FormatError
    from quantbench.formats.io import open_artifact

    loaded = open_artifact(gptq_artifact)
    loaded.expected_shapes[Q1 + ".weight"] = (64, 32)
    with pytest.raises(FormatError, match=r"decodes to shape \[64, 64\]"):
        loaded.quantized(Q1 + ".weight")
    art = _artifact_copy(gptq_artifact, tmp_path)
    _edit_manifest(art, lambda m: m["tensors"][L0 + "mlp.up_proj.weight"].__setitem__(
        "shape", [128, 32]))
    assert_refused(qb("eval", art, "--baseline", fresh_llama(), "--ctx", 64, "--max-tokens",
                      256, "--no-cache"), L0 + "mlp.up_proj.weight", "[128, 32]")
    assert json.loads((art / "quantbench.json").read_text())["eval"] is None


def test_fused_projection_rows_are_checked_from_their_parts():
    """A Phi-3-like fused qkv_proj: its rows are the sum of its declared parts; its input
    width, not declared, is not checked."""
    import dataclasses

    from quantbench.errors import ModelLoadError
    from quantbench.models.arch import LLAMA, Fused
    from quantbench.models.validate import Context, check_tensors

    qkv = Fused("self_attn.qkv_proj", (("q", "num_attention_heads*head_dim"),
                                       ("k", "num_key_value_heads*head_dim"),
                                       ("v", "num_key_value_heads*head_dim")))
    spec = dataclasses.replace(LLAMA, linears=("self_attn.qkv_proj", "self_attn.o_proj",
                                               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
                               fused=(qkv,))
    config = {"num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 10,
              "tie_word_embeddings": True}
    block = {"self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64),
             "mlp.up_proj": (128, 64), "mlp.down_proj": (64, 128), "input_layernorm": (64,),
             "post_attention_layernorm": (64,), "self_attn.qkv_proj": (128, 7)}
    shapes = {"model.embed_tokens.weight": (10, 64), "model.norm.weight": (64,),
              **{f"{L0}{m}.weight": s for m, s in block.items()}}
    assert check_tensors(config, spec, shapes, Context("x")) == []
    shapes[f"{L0}self_attn.qkv_proj.weight"] = (96, 64)
    with pytest.raises(ModelLoadError, match=r"\[96, 64\].*\[128, \?\].*4\*16\+2\*16\+2\*16"):
        check_tensors(config, spec, shapes, Context("x"))


@pytest.mark.parametrize("index, needle", [
    ("[1, 2]", "holds a list, not a JSON object"),
    ('{"weight_map": ["a"]}', "no 'weight_map' object"),
    ('{"weight_map": {}}', "no 'weight_map' object"),
    ('{"metadata": {}}', "no 'weight_map' object"),
    ('{"weight_map": {"model.norm.weight": "../model.safetensors"}}', "not a shard file name"),
    ('{"weight_map": {"model.norm.weight": 5}}', "not a shard file name"),
    ("{", "not valid JSON"),
])
def test_a_damaged_shard_index_is_one_line(qb, fresh_llama, index, needle):
    src = fresh_llama()
    (src / "model.safetensors.index.json").write_text(index)
    assert_refused(qb("inspect", src), "model.safetensors.index.json", needle)


@pytest.mark.parametrize("value", [7, "float17", ["float16"]])
def test_a_config_dtype_that_is_no_dtype_is_refused(qb, fresh_llama, tmp_path, value):
    src = fresh_llama()
    config = json.loads((src / "config.json").read_text())
    config["torch_dtype"] = value
    (src / "config.json").write_text(json.dumps(config))
    assert_refused(qb("convert", src, "-o", tmp_path / "out", "-g", 32), "torch_dtype",
                   "not a dtype")
    assert not (tmp_path / "out").exists()
