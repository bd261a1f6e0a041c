"""Class 1, GGUF files: the header is walked within bounds before gguf-py reads it, and the
tensors must be the ones the metadata implies.

A Q8_0 GGUF of a tiny llama is written once by our own writer (``convert --type Q8_0``); each
case forges a copy (truncations, counts, string/array lengths, tensor infos, metadata, a
dropped block) and runs it through both readers: as a source (``convert x.gguf``, imported
into an FP16 checkpoint) and as an artifact (``inspect x.gguf``). Each must be refused in one
line naming the problem, with no output and no import left in the cache.
"""
from __future__ import annotations

import struct
from pathlib import Path

import gguf
import pytest

from tests.conftest import rewrite_gguf
from tests.faults.conftest import assert_no_leftovers, assert_refused


@pytest.fixture(scope="module")
def pristine_gguf(tmp_path_factory) -> Path:
    from quantbench.cli import main
    from tests.conftest import make_tiny_llama

    root = tmp_path_factory.mktemp("gguf-faults")
    src = make_tiny_llama(root / "src")
    try:
        main(["convert", str(src), "--type", "Q8_0", "-o", str(root / "q")])
    except SystemExit as exc:
        assert not exc.code
    return root / "q" / "model.gguf"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class Layout:
    """Byte positions in the pristine file, from gguf-py's reader (trusted there)."""

    def __init__(self, path: Path):
        reader = gguf.GGUFReader(str(path))
        self.size = path.stat().st_size
        self.data_offset = reader.data_offset
        self.keys = {k: f.offset for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        self.tensors = {t.name: t.field.offset for t in reader.tensors}
        self.data = {t.name: t.data_offset for t in reader.tensors}

    def value(self, key: str) -> int:
        """Where a key's value starts (after its length, name and type)."""
        return self.keys[key] + 8 + len(key) + 4

    def dims(self, tensor: str) -> int:
        return self.tensors[tensor] + 8 + len(tensor) + 4

    def after_dims(self, tensor: str, n_dims: int) -> int:
        return self.dims(tensor) + 8 * n_dims


def u32(data: bytearray, at: int, value: int) -> None:
    data[at:at + 4] = struct.pack("<I", value)


def u64(data: bytearray, at: int, value: int) -> None:
    data[at:at + 8] = struct.pack("<Q", value)


def _truncate(fraction_or_offset):
    def forge(data: bytearray, lay: Layout) -> bytes:
        at = fraction_or_offset(lay) if callable(fraction_or_offset) else fraction_or_offset
        return bytes(data[:at])
    return forge


def _patch(fn):
    def forge(data: bytearray, lay: Layout) -> bytes:
        fn(data, lay)
        return bytes(data)
    return forge


def f32(data: bytearray, at: int, value: float) -> None:
    data[at:at + 4] = struct.pack("<f", value)


TOKENS = "tokenizer.ggml.tokens"
EPS, BOS = "llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.bos_token_id"
K0, Q0 = "blk.0.attn_k.weight", "blk.0.attn_q.weight"
LAST = "blk.1.attn_v.weight"

# name: (forge, needles of the refusal)
FORGES = {
    "truncated-empty": (_truncate(0), ["0 bytes"]),
    "truncated-in-magic": (_truncate(3), ["3 bytes"]),
    "truncated-in-counts": (_truncate(20), ["20 bytes"]),
    "truncated-in-metadata": (_truncate(lambda lay: lay.value(TOKENS) + 200), [TOKENS]),
    "truncated-in-tensor-infos": (_truncate(lambda lay: lay.dims(K0) + 3), [K0]),
    "truncated-in-data": (_truncate(lambda lay: lay.data[Q0] + 7), [Q0, "runs past the end"]),
    "truncated-last-byte": (_truncate(lambda lay: lay.size - 1), [LAST, "runs past the end"]),
    "magic": (_patch(lambda d, lay: d.__setitem__(slice(0, 4), b"GGUX")), ["b'GGUX'"]),
    "version": (_patch(lambda d, lay: u32(d, 4, 7)), ["version 7"]),
    "tensor-count-up": (_patch(lambda d, lay: u64(d, 8, 34)), ["tensor"]),
    "tensor-count-down": (_patch(lambda d, lay: u64(d, 8, 20)), ["belong to no tensor"]),
    "tensor-count-huge": (_patch(lambda d, lay: u64(d, 8, 1 << 40)),
                          ["1099511627776 tensors", "more than"]),
    "kv-count-up": (_patch(lambda d, lay: u64(d, 16, 29)), []),
    "kv-count-down": (_patch(lambda d, lay: u64(d, 16, 27)), []),
    "kv-count-huge": (_patch(lambda d, lay: u64(d, 16, 1 << 50)), ["key/values", "more than"]),
    "key-length-huge": (_patch(lambda d, lay: u64(d, 24, 1 << 62)), ["key 0"]),
    "string-value-huge": (_patch(lambda d, lay: u64(d, lay.value("general.name"), 1 << 40)),
                          ["'general.name'"]),
    "token-string-huge": (_patch(lambda d, lay: u64(d, lay.value(TOKENS) + 12, 1 << 33)),
                          ["item 0", TOKENS]),
    "string-array-length-huge": (_patch(lambda d, lay: u64(d, lay.value(TOKENS) + 4, 1 << 40)),
                                 ["1099511627776 items", TOKENS]),
    "number-array-length-huge": (
        _patch(lambda d, lay: u64(d, lay.value("tokenizer.ggml.token_type") + 4, 1 << 40)),
        ["tokenizer.ggml.token_type"]),
    "value-type-unknown": (_patch(lambda d, lay: u32(d, lay.value("general.name") - 4, 13)),
                           ["value type 13"]),
    "tensor-name-length-huge": (_patch(lambda d, lay: u64(d, lay.tensors[K0], 1 << 40)),
                                ["the name of tensor"]),
    "tensor-dims-count": (_patch(lambda d, lay: u32(d, lay.dims(K0) - 4, 7)),
                          [K0, "7 dimensions"]),
    "tensor-type-unknown": (_patch(lambda d, lay: u32(d, lay.after_dims(K0, 2), 99)),
                            [K0, "ggml type 99"]),
    "tensor-type-smaller": (_patch(lambda d, lay: u32(d, lay.after_dims(Q0, 2), 2)),  # Q4_0
                            [f"after tensor {Q0}", "belong to no tensor"]),
    "last-tensor-type-smaller": (_patch(lambda d, lay: u32(d, lay.after_dims(LAST, 2), 2)),
                                 [f"after tensor {LAST}", "belong to no tensor"]),
    "tensor-type-larger": (_patch(lambda d, lay: u32(d, lay.after_dims(K0, 2), 0)),  # F32
                           [K0, "overlaps"]),
    "tensor-offset-past-end": (
        _patch(lambda d, lay: u64(d, lay.after_dims(LAST, 2) + 4, lay.size - lay.data_offset)),
        [LAST, "runs past the end"]),
    "tensor-offset-misaligned": (
        _patch(lambda d, lay: u64(d, lay.after_dims(Q0, 2) + 4,
                                  lay.data[Q0] - lay.data_offset + 1)), [Q0, "alignment"]),
    "tensors-overlap": (
        _patch(lambda d, lay: u64(d, lay.after_dims(Q0, 2) + 4, lay.data[K0] - lay.data_offset)),
        ["overlaps"]),
    "tensor-dims-zero": (_patch(lambda d, lay: u64(d, lay.dims(K0) + 8, 0)), [K0]),
    "shape-swapped-same-bytes": (
        _patch(lambda d, lay: (u64(d, lay.dims(K0), 32), u64(d, lay.dims(K0) + 8, 64))),
        [K0, "[64, 32]", "[32, 64]", "llama.attention.head_count_kv"]),
    "embedding-shape-swapped": (
        _patch(lambda d, lay: (u64(d, lay.dims("token_embd.weight"), 320),
                               u64(d, lay.dims("token_embd.weight") + 8, 64))),
        ["token_embd.weight", "[64, 320]"]),
    "tensor-renamed": (_patch(lambda d, lay: d.__setitem__(
        slice(lay.tensors[Q0] + 8, lay.tensors[Q0] + 8 + len(Q0)), b"blk.0.attn_x.weight")),
        ["blk.0.attn_x.weight"]),
    "block-count-down": (_patch(lambda d, lay: u32(d, lay.value("llama.block_count"), 1)),
                         ["hold 2 layers", "llama.block_count is 1"]),
    "block-count-up": (_patch(lambda d, lay: u32(d, lay.value("llama.block_count"), 3)),
                       ["llama.block_count is 3", "hold 2 layers"]),
    "block-count-zero": (_patch(lambda d, lay: u32(d, lay.value("llama.block_count"), 0)),
                         ["llama.block_count", "positive"]),
    "block-count-float": (_patch(lambda d, lay: u32(d, lay.value("llama.block_count") - 4, 6)),
                          ["llama.block_count", "not a positive int"]),
    "kv-heads": (_patch(lambda d, lay: u32(d, lay.value("llama.attention.head_count_kv"), 4)),
                 [K0, "llama.attention.head_count_kv"]),
    "hidden": (_patch(lambda d, lay: u32(d, lay.value("llama.embedding_length"), 96)),
               ["token_embd.weight", "llama.embedding_length"]),
    "feed-forward": (_patch(lambda d, lay: u32(d, lay.value("llama.feed_forward_length"), 64)),
                     ["ffn_gate.weight", "llama.feed_forward_length"]),
    "vocab": (_patch(lambda d, lay: u32(d, lay.value("llama.vocab_size"), 321)),
              ["token_embd.weight", "llama.vocab_size=321"]),
    "key-missing": (_patch(lambda d, lay: d.__setitem__(
        slice(lay.keys["llama.feed_forward_length"] + 8,
              lay.keys["llama.feed_forward_length"] + 8 + 25), b"llama.feed_forward_lengtX")),
        ["no 'llama.feed_forward_length'"]),
    "eps-nan": (_patch(lambda d, lay: f32(d, lay.value(EPS), float("nan"))),
                [EPS, "not a positive number"]),
    "eps-negative": (_patch(lambda d, lay: f32(d, lay.value(EPS), -1.0)), [EPS, "-1.0"]),
    "rope-base-inf": (_patch(lambda d, lay: f32(d, lay.value("llama.rope.freq_base"),
                                                float("inf"))), ["llama.rope.freq_base", "inf"]),
    "bos-outside-vocab": (_patch(lambda d, lay: u32(d, lay.value(BOS), 9999)),
                          [BOS, "9999", "0 to 319"]),
    "heads-not-dividing-hidden": (
        _patch(lambda d, lay: u32(d, lay.value("llama.attention.head_count"), 3)),
        ["not a multiple of the number of attention heads"]),
    "key-duplicated": (_patch(lambda d, lay: d.__setitem__(
        slice(lay.keys["general.file_type"] + 8, lay.keys["general.file_type"] + 8 + 17),
        b"llama.block_count")), ["'llama.block_count' appears twice"]),
}


def _forged(pristine: Path, tmp_path: Path, forge) -> Path:
    data = bytearray(pristine.read_bytes())
    out = tmp_path / "forged.gguf"
    out.write_bytes(forge(data, Layout(pristine)))
    return out


@pytest.mark.parametrize("case", sorted(FORGES))
def test_forged_gguf_is_refused_as_source_and_as_artifact(case, qb, pristine_gguf, cache,
                                                          tmp_path):
    forge, needles = FORGES[case]
    bad = _forged(pristine_gguf, tmp_path, forge)
    outputs = tmp_path / "outputs"
    assert_refused(qb("convert", bad, "-o", outputs / "hf"), str(bad), *needles)
    assert_refused(qb("inspect", bad), str(bad), *needles)
    assert_no_leftovers(outputs)
    assert not list(cache.glob("gguf/*/config.json")), "an import was cached"


def _rewrite(pristine: Path, out: Path, keep_tensor=lambda name: True) -> Path:
    """The pristine file written again by gguf-py with only some tensors (metadata as is)."""
    return rewrite_gguf(pristine, out, keep_tensor)


@pytest.mark.parametrize("dropped,needles", [
    ("blk.1.", ["llama.block_count is 2", "hold 1 layers"]),
    ("blk.0.ffn_up.", ["blk.0.ffn_up.weight", "missing"]),
    ("output_norm.", ["output_norm.weight", "missing"]),
])
def test_a_file_with_fewer_tensors_is_never_a_smaller_model(dropped, needles, qb,
                                                             pristine_gguf, cache, tmp_path):
    bad = _rewrite(pristine_gguf, tmp_path / "fewer.gguf",
                   lambda name: not name.startswith(dropped))
    assert_refused(qb("convert", bad, "-o", tmp_path / "hf"), *needles)
    assert_refused(qb("inspect", bad), *needles)
    assert_no_leftovers(tmp_path, keep=("fewer.gguf", "cache"))


def test_the_pristine_file_and_a_rewrite_of_it_are_accepted(qb, pristine_gguf, cache,
                                                            tmp_path):
    """The forge helpers damage only what each case says: untouched, the file imports."""
    same = _rewrite(pristine_gguf, tmp_path / "same.gguf")
    result = qb("inspect", same)
    assert result.code == 0, result.stderr
    result = qb("convert", pristine_gguf, "-o", tmp_path / "hf")
    assert result.code == 0, result.stderr
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_header_walk_bounds_every_length_without_reading_the_data(tmp_path):
    """The walk refuses a huge array length at once (gguf-py would loop over it)."""
    import time

    from quantbench.errors import FormatError
    from quantbench.formats.gguf_check import check_gguf

    writer = gguf.GGUFWriter(str(tmp_path / "a.gguf"), "llama")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = bytearray((tmp_path / "a.gguf").read_bytes())
    at = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 4 + 4
    u64(data, at, (1 << 63) - 1)
    (tmp_path / "a.gguf").write_bytes(bytes(data))
    start = time.perf_counter()
    with pytest.raises(FormatError, match="items"):
        check_gguf(tmp_path / "a.gguf", FormatError)
    assert time.perf_counter() - start < 1


@pytest.mark.parametrize("family,key,scale,needles", [
    ("phi3", "phi3.rope.dimension_count", 2, ["phi3.rope.dimension_count", "head size"]),
    ("qwen3", "qwen3.attention.value_length", 2, ["qwen3.attention.value_length", "key head"]),
])
def test_head_sizes_the_weights_cannot_have_are_refused(family, key, scale, needles, qb,
                                                        tmp_path, cache):
    """Keys no tensor shape checks: rotary dimensions beyond the head (accepted, it failed at
    evaluation inside the rotary embedding) and a value head size other than the key head size
    (accepted and ignored) are refused at import, in one line, leaving nothing behind."""
    from tests.models.test_family_phi3 import make_tiny_phi3
    from tests.models.test_family_qwen3 import make_tiny_qwen3

    make = {"phi3": make_tiny_phi3, "qwen3": make_tiny_qwen3}[family]
    src = make(tmp_path / "src")
    assert qb("convert", src, "--type", "Q8_0", "-o", tmp_path / "q").code == 0
    good = tmp_path / "q" / "model.gguf"
    value = gguf.GGUFReader(str(good)).fields[key].contents()
    bad = rewrite_gguf(good, tmp_path / "bad.gguf", kvs={key: value * scale})
    out = tmp_path / "out"
    assert_refused(qb("convert", bad, "--format", "dense", "-o", out), *needles)
    assert_refused(qb("inspect", bad), *needles)
    assert_no_leftovers(out)
    assert not list(cache.glob("gguf/*/config.json")), "an import was cached"
