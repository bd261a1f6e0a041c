"""GGUF metadata, tokenizer, tensor names and mixtures against llama.cpp's own tools.

Ground truth: llama.cpp's ``convert_hf_to_gguf.py`` from the pinned llama-cpp-python sdist
(``llamacpp.converter_dir()``), run on the same checkpoint with ``--outtype f16``, and
``llama-quantize`` (``llamacpp`` fixture) for the per-tensor types of each mixture.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from quantbench.errors import ConfigError
from quantbench.formats.gguf_meta import (
    KV,
    checkpoint_shapes,
    gguf_arch,
    gguf_metadata,
    generated_tensors,
    gguf_name,
    size_label,
    tensor_plan,
    to_gguf_tensor,
)
from quantbench.quant.gguf.mixtures import FILE_TYPES, fallback, file_type, tensor_types
from quantbench.formats.gguf_vocab import bpe_pre_tokenizer
from quantbench.models.sample import cache_root

SAMPLE_DIR = cache_root() / "samples" / "smollm2-fp16"
# keys whose value legitimately differs from the converter's, with the reason
LEGIT_DIFF = {
    # the converter titles `_name_or_path` (here "") or the folder name; an empty
    # `_name_or_path` makes it write no name at all, we always name the model
    "general.name",
}
# Run the converter with two patches that change nothing for the models here: a BPE
# pre-tokenizer it does not know becomes "gpt-2" when it is GPT-2's plain byte-level split, else
# "default", as ours does (the converter raises; the tiny tokenizers are ours), and
# the SentencePiece import is only tried when a tokenizer.model exists (so the package is needed
# only for SentencePiece models).
WRAPPER = """
import runpy, sys
conv = sys.argv[1]
script = conv + "/convert_hf_to_gguf.py"
sys.argv = [script] + sys.argv[2:]
sys.path[:0] = [conv, conv + "/gguf-py"]
from conversion import base
_pre, _spm = base.TextModel.get_vocab_base_pre, base.TextModel._create_vocab_sentencepiece
def pre(self, tokenizer):
    try:
        return _pre(self, tokenizer)
    except NotImplementedError:
        import json
        spec = json.loads((self.dir_model / "tokenizer.json").read_text()).get("pre_tokenizer")
        return "gpt-2" if (spec or {}).get("type") == "ByteLevel" else "default"
def spm(self):
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError("no tokenizer.model")
    return _spm(self)
base.TextModel.get_vocab_base_pre, base.TextModel._create_vocab_sentencepiece = pre, spm
runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture(scope="session")
def converter() -> Path:
    from quantbench.runtimes import llamacpp

    try:
        return llamacpp.converter_dir()
    except llamacpp.LlamaCppUnavailable as exc:
        pytest.skip(f"llama.cpp's converter is unavailable: {exc}")


def convert(converter: Path, model_dir: Path, out: Path) -> gguf.GGUFReader:
    """llama.cpp's converter on ``model_dir`` → F16 GGUF ``out``, opened."""
    script = out.parent / "convert_wrapper.py"
    script.write_text(WRAPPER)
    proc = subprocess.run([sys.executable, str(script), str(converter), str(model_dir),
                           "--outtype", "f16", "--outfile", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return gguf.GGUFReader(str(out))


def field_value(field) -> tuple:
    """(value, [types]) of a GGUFReader field, floats as float32 like ours after writing."""
    types = [gguf.GGUFValueType(t) for t in field.types]
    return field.contents(), types


def assert_same_metadata(ours: list[KV], reader: gguf.GGUFReader, skip=frozenset()) -> None:
    theirs = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    mine = {kv.key: kv for kv in ours}
    assert set(mine) - skip == set(theirs) - skip
    for key in sorted(set(theirs) - skip):
        value, types = field_value(theirs[key])
        kv = mine[key]
        assert [kv.vtype] + ([kv.sub_type] if kv.sub_type else []) == types, key
        if kv.vtype == gguf.GGUFValueType.FLOAT32:
            assert np.float32(kv.value) == np.float32(value), key
        elif kv.sub_type == gguf.GGUFValueType.FLOAT32:
            np.testing.assert_array_equal(np.float32(kv.value), np.float32(value), err_msg=key)
        else:
            assert kv.value == value, key
    order = [k for k in theirs if k not in skip]
    assert [k for k in mine if k not in skip] == order  # the same order, too


def gguf_tensors(reader: gguf.GGUFReader) -> dict[str, tuple]:
    return {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}


# ------------------------------------------------------------------- against the converter

def assert_matches_converter(converter: Path, model_dir: Path, out: Path) -> gguf.GGUFReader:
    """Our metadata, tensor names/shapes and tensor rows (Q/K permuted) = the converter's."""
    config = json.loads((model_dir / "config.json").read_text())
    reader = convert(converter, model_dir, out)
    assert_same_metadata(gguf_metadata(config, model_dir), reader)
    plan = tensor_plan(checkpoint_shapes(model_dir), config)
    assert {g: ne for _, g, ne in plan} == gguf_tensors(reader)
    weights = load_file(str(model_dir / "model.safetensors"))
    data = {t.name: np.asarray(t.data).astype(np.float32) for t in reader.tensors}
    made = generated_tensors(config)  # llama3's rope_freqs, Phi-3's LongRoPE factors
    for hf, name, _ in plan:
        ours = to_gguf_tensor(hf, weights[hf], config) if hf else made[name]
        np.testing.assert_array_equal(ours.to(torch.float32).numpy(), data[name], err_msg=name)
    return reader



def assert_quantizes_like_llama_quantize(llamacpp, converter: Path, model_dir: Path,
                                         ftype: str, tmp_path: Path) -> gguf.GGUFReader:
    """``llama-quantize <ftype>`` of the converter's F16 GGUF and our RTN GGUF of the same
    checkpoint hold every tensor in the same ggml type with the same bytes (norms included:
    Gemma's + 1)."""
    from quantbench.api import quantize, save
    from quantbench.models.loader import load_model

    convert(converter, model_dir, tmp_path / "f16.gguf")
    llamacpp.run("llama-quantize", tmp_path / "f16.gguf", tmp_path / "theirs.gguf", ftype, "2")
    ours = save(quantize(load_model(model_dir), method="rtn", gguf_type=ftype, progress=False),
                tmp_path / "ours", format="gguf", progress=False)
    mine = {t.name: t for t in gguf.GGUFReader(str(ours / "model.gguf")).tensors}
    reader = gguf.GGUFReader(str(tmp_path / "theirs.gguf"))
    theirs = {t.name: t for t in reader.tensors}
    assert sorted(mine) == sorted(theirs)
    for name, t in theirs.items():
        assert mine[name].tensor_type == t.tensor_type, (name, mine[name].tensor_type.name,
                                                         t.tensor_type.name)
        assert np.asarray(mine[name].data).tobytes() == np.asarray(t.data).tobytes(), name
    return reader

@pytest.mark.parametrize("tied", [False, True])
def test_tiny_llama_matches_converter(tied, tiny_llama, tiny_llama_tied, converter, tmp_path):
    reader = assert_matches_converter(converter, tiny_llama_tied if tied else tiny_llama,
                                      tmp_path / "ref.gguf")
    assert ("output.weight" in gguf_tensors(reader)) is not tied


VARIANTS = {  # HF config class, model class, extra config
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True,
                                                  "bos_token_id": None, "eos_token_id": 2}),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 128}}),
    "yarn": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
        "beta_slow": 1.0, "original_max_position_embeddings": 128}}),
    "linear-bias": ("LlamaConfig", "LlamaForCausalLM", {"attention_bias": True, "rope_parameters": {
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
}


def _qwen_tokenizer(directory: Path) -> None:
    """A byte-level BPE with Qwen's special tokens (transformers' Qwen2Tokenizer, which the
    converter loads for model_type qwen2, would otherwise add them past the vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_text(), trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "bos_token": None,
        "pad_token": "<|endoftext|>", "add_prefix_space": False, "chat_template": "{{ x }}"}))


@pytest.mark.slow  # five converter runs
@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_variants_match_converter(kind, converter, tmp_path):
    """mistral, qwen2 (no Q/K permutation, q/k/v biases), llama3 RoPE (rope_freqs tensor), yarn
    and linear RoPE scaling keys, attention biases (permuted too)."""
    model_dir = make_variant(kind, tmp_path / kind)
    assert_matches_converter(converter, model_dir, tmp_path / "ref.gguf")
    assert_imports_back(tmp_path / "ref.gguf", model_dir, tmp_path / "back")


def make_variant(kind: str, model_dir: Path) -> Path:
    """A tiny random checkpoint of ``VARIANTS[kind]`` with its tokenizer."""
    import transformers

    from tests.conftest import make_tokenizer

    cfg_cls, model_cls, extra = VARIANTS[kind]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**{
        "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "bos_token_id": 0, "eos_token_id": 1, **extra})
    getattr(transformers, model_cls)(cfg).to(torch.float16).save_pretrained(str(model_dir))
    (_qwen_tokenizer if kind == "qwen2" else make_tokenizer)(model_dir)
    return model_dir


@pytest.mark.slow  # llama.cpp runs
def test_llama3_rope_gguf_runs_in_llama_cpp_with_our_perplexity(tmp_path, llama_vs_ours):
    """Llama 3.x RoPE scaling: our GGUF carries the rope_freqs tensor the converter makes (first,
    as it writes it), and llama.cpp scores the file as our evaluator does."""
    from quantbench.api import quantize, save
    from quantbench.formats.gguf_meta import rope_freqs
    from quantbench.models.loader import load_model

    model = load_model(make_variant("llama3-rope", tmp_path / "llama3"))
    out = save(quantize(model, method="rtn", gguf_type="Q8_0", progress=False),
               tmp_path / "q8", format="gguf", progress=False)
    first = gguf.GGUFReader(str(out / "model.gguf")).tensors[0]
    assert first.name == "rope_freqs.weight"
    np.testing.assert_array_equal(np.asarray(first.data),
                                  rope_freqs(json.loads((tmp_path / "llama3" / "config.json")
                                                        .read_text())).numpy())
    mine, theirs, same_tokens = llama_vs_ours(out, model, ctx=64, chunks=4)
    assert same_tokens
    assert abs(mine / theirs - 1) < 0.005, (mine, theirs)


def assert_imports_back(gguf_file: Path, model_dir: Path, out: Path) -> None:
    """llama.cpp's file read back by quantbench (GGUF → HF checkpoint): the same architecture,
    RoPE (llama3's rope_freqs tensor turned back into rope_parameters), biases and weights —
    the same logits as the original model."""
    import transformers

    from quantbench.models.gguf_import import convert_gguf_to_hf

    convert_gguf_to_hf(gguf_file, out, dtype=torch.float32, tokenizer=False)
    original = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir),
                                                                 dtype=torch.float32)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    want, got = original.config.to_dict(), back.config.to_dict()
    # mistral is GGUF arch llama (llama.cpp runs it as one): it comes back a llama
    assert got["model_type"] == {"mistral": "llama"}.get(want["model_type"], want["model_type"])
    for key in ("num_key_value_heads", "tie_word_embeddings", "rope_parameters",
                "attention_bias", "head_dim"):
        if key not in want:  # e.g. mistral's config has no attention_bias
            continue
        assert got.get(key) == want.get(key) or (
            key == "rope_parameters" and _same_rope(got[key], want[key])), key
    ids = torch.randint(0, original.config.vocab_size, (2, 200), generator=torch.Generator()
                        .manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, original(ids).logits, rtol=1e-4, atol=1e-4)


def _same_rope(got: dict, want: dict) -> bool:
    """llama3 scaling is stored as per-frequency factors: any parameters that regenerate them
    are the same RoPE (HF also adds defaults such as attention_factor for yarn)."""
    from quantbench.formats.gguf_meta import rope_freqs

    if got.get("rope_type") == "llama3":
        cfg = lambda r: {"model_type": "llama", "rope_parameters": r,  # noqa: E731
                         "hidden_size": 64, "num_attention_heads": 4}
        return torch.allclose(rope_freqs(cfg(got)), rope_freqs(cfg(want)), rtol=1e-5)
    return all(got.get(k) == v for k, v in want.items() if v is not None)


def _tiny_model(directory: Path, vocab_size: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(str(directory))
    return json.loads((directory / "config.json").read_text())


def _text() -> list[str]:
    from tests.conftest import _wikitext_head

    text = _wikitext_head(100_000)
    return [text[i:i + 2000] for i in range(0, len(text), 2000)]


def test_byte_fallback_bpe_tokenizer_matches_converter(converter, tmp_path):
    """A SentencePiece-style tokenizer.json (Llama 2 / Mistral saved by transformers 5)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                           normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(_text(), trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                         limit_alphabet=60))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<|im_start|>"])
    tok.add_tokens(["<extra>"])
    model_dir = tmp_path / "model"
    config = _tiny_model(model_dir, tok.get_vocab_size())
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TokenizersBackend", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    reader = convert(converter, model_dir, tmp_path / "ref.gguf")
    assert_same_metadata(gguf_metadata(config, model_dir), reader)
    types = dict(zip(*[reader.fields[k].contents() for k in ("tokenizer.ggml.tokens",
                                                              "tokenizer.ggml.token_type")]))
    assert (types["<0x41>"], types["<s>"], types["<extra>"]) == (6, 3, 4)


def test_sentencepiece_model_matches_converter(converter, tmp_path):
    """tokenizer.model read with our protobuf reader = the converter's sentencepiece reading."""
    spm = pytest.importorskip("sentencepiece", reason="the converter needs sentencepiece here")
    import io

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_text()), model_writer=model,
                                   vocab_size=400, model_type="bpe", byte_fallback=True,
                                   user_defined_symbols=["<tool>"], minloglevel=2)
    model_dir = tmp_path / "model"
    config = _tiny_model(model_dir, 400)
    (model_dir / "tokenizer.model").write_bytes(model.getvalue())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "added_tokens_decoder": {"2": {"content": "</s>", "special": True},
                                 "399": {"content": "<|im_end|>", "special": False}}}))
    (model_dir / "added_tokens.json").write_text(json.dumps({"<pad>": 398}))
    reader = convert(converter, model_dir, tmp_path / "ref.gguf")
    assert_same_metadata(gguf_metadata(config, model_dir), reader)
    assert 6 in reader.fields["tokenizer.ggml.token_type"].contents()  # byte tokens


@pytest.mark.slow
def test_sample_matches_converter(converter, tmp_path):
    if not (SAMPLE_DIR / "tokenizer.json").is_file():
        pytest.skip(f"the sample model is not cached at {SAMPLE_DIR}")
    config = json.loads((SAMPLE_DIR / "config.json").read_text())
    reader = convert(converter, SAMPLE_DIR, tmp_path / "ref.gguf")
    ours = gguf_metadata(config, SAMPLE_DIR)
    assert_same_metadata(ours, reader, skip=LEGIT_DIFF)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    plan = tensor_plan(checkpoint_shapes(SAMPLE_DIR), config)
    assert {g: ne for _, g, ne in plan} == gguf_tensors(reader)


SPECIAL_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1] + "/gguf-py")
import gguf
gw = gguf.GGUFWriter(path=None, arch="llama")
n_vocab = None if sys.argv[4] == "-" else int(sys.argv[4])
gguf.SpecialVocab(sys.argv[2], load_merges=sys.argv[3] == "1", n_vocab=n_vocab).add_to_gguf(gw)
print(json.dumps([[k, v.value, v.type.name] for k, v in gw.kv_data[0].items()
                  if k != "general.architecture"]))
"""
BOT, EOT, END = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"
_ADDED = [{"id": 5 + i, "content": t, "special": True} for i, t in enumerate((BOT, END, EOT))]
_PAIR = [{"Sequence": {"id": "A"}}, {"SpecialToken": {"id": "</s>"}}, {"Sequence": {"id": "B"}}]
SPECIAL_CASES = {  # name: (tokenizer.json, tokenizer_config.json, config.json, extra files)
    "llama3": ({"model": {"type": "BPE", "vocab": {}, "merges": [["a", "b"], ["a b", "c"]]},
                "added_tokens": _ADDED, "post_processor": {"type": "Sequence", "processors": [
                    {"type": "ByteLevel"},
                    {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": BOT}},
                                                              {"Sequence": {"id": "A"}}],
                     "pair": [{"SpecialToken": {"id": BOT}}, {"Sequence": {"id": "A"}},
                              {"SpecialToken": {"id": BOT}}, {"Sequence": {"id": "B"}}]}]}},
               {"bos_token": BOT, "eos_token": EOT, "chat_template": "{{ bos_token }}"},
               {"bos_token_id": 5, "eos_token_id": [6, 7]}, {}),
    "trailing-eos": ({"model": {"type": "BPE", "vocab": {}, "merges": ["a b"]},
                      "added_tokens": _ADDED + [{"id": 1, "content": "</s>"}],
                      "post_processor": {"type": "TemplateProcessing", "single": [
                          {"SpecialToken": {"id": BOT}}, {"Sequence": {"id": "A"}},
                          {"SpecialToken": {"id": "</s>"}}], "pair": _PAIR}},
                     {"bos_token": {"content": BOT}, "eos_token": EOT, "pad_token": END,
                      "add_eos_token": False, "unk_token": "<nope>"},
                     {"pad_token_id": 9}, {}),
    "roberta": ({"model": {"type": "BPE", "vocab": {}}, "added_tokens": [
                    {"id": 0, "content": "<s>"}, {"id": 2, "content": "</s>"},
                    {"id": 3, "content": "<mask>"}],
                 "post_processor": {"type": "RobertaProcessing", "sep": ["</s>", 2],
                                    "cls": ["<s>", 0]},
                 "normalizer": {"type": "BertNormalizer", "lowercase": True}},
                {"mask_token": "<mask>"}, {}, {"merges.txt": "#version: 0.2\na b\nab c\nbad\n"}),
    "no-config": ({"model": {"type": "BPE", "vocab": {}, "merges": ["a b"]}, "added_tokens": [],
                   "post_processor": {"type": "TemplateProcessing", "single": [
                       {"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}}]}},
                  None, {"bos_token_id": 1, "eos_token_id": 2, "unk_token_id": 99}, {}),
    "templates": (None, {"add_bos_token": True, "bos_token": "<s>"}, {"bos_token_id": 1},
                  {"chat_template.jinja": "{{ default }}",
                   "additional_chat_templates/tool-use.jinja": "{{ tools }}"}),
}


@pytest.mark.parametrize("case", sorted(SPECIAL_CASES))
@pytest.mark.parametrize("n_vocab", [None, 8])
def test_special_tokens_match_gguf_py(case, n_vocab, converter, tmp_path):
    """gguf_special = the sdist's gguf-py SpecialVocab on hand-made tokenizer files."""
    from quantbench.formats.gguf_special import special_metadata

    tok_json, tok_cfg, config, extra = SPECIAL_CASES[case]
    for name, content in [("tokenizer.json", tok_json), ("tokenizer_config.json", tok_cfg),
                          ("config.json", config)]:
        if content is not None:
            (tmp_path / name).write_text(json.dumps(content))
    for name, text in extra.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    script = tmp_path.parent / f"special_{tmp_path.name}.py"
    script.write_text(SPECIAL_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(converter), str(tmp_path),
                           "1" if n_vocab is None else "0", str(n_vocab or "-")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = special_metadata(tmp_path, load_merges=n_vocab is None, n_vocab=n_vocab)
    assert [[kv.key, kv.value, kv.vtype.name] for kv in ours] == json.loads(proc.stdout)


# -------------------------------------------------------------------------------- units

def test_pre_tokenizer_hash_names_smollm():
    if not (SAMPLE_DIR / "tokenizer.json").is_file():
        pytest.skip(f"the sample model is not cached at {SAMPLE_DIR}")
    assert bpe_pre_tokenizer(SAMPLE_DIR) == "smollm"


def test_unknown_pre_tokenizer(tiny_llama, tmp_path):
    config = json.loads((tiny_llama / "config.json").read_text())
    kvs = {kv.key: kv.value for kv in gguf_metadata(config, tiny_llama)}
    assert kvs["tokenizer.ggml.pre"] == "gpt-2"  # GPT-2's own byte-level split, unhashed
    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, tok["pre_tokenizer"]]}
    (other / "tokenizer.json").write_text(json.dumps(tok))
    kvs = {kv.key: kv.value for kv in gguf_metadata(config, other)}
    assert kvs["tokenizer.ggml.pre"] == "default"
    with pytest.raises(ConfigError, match="pre-tokenizer"):
        gguf_metadata(config, other, unknown_pre=None)


def test_unsupported_architecture():
    with pytest.raises(ConfigError, match="supported: llama, mistral, qwen2"):
        gguf_arch({"model_type": "gpt_neox"})
    assert gguf_arch({"model_type": "mistral"}) == "llama"
    assert gguf_arch({"model_type": "qwen2"}) == "qwen2"


def test_names_and_file_types():
    cfg = {"model_type": "llama", "tie_word_embeddings": True}
    assert gguf_name("model.layers.7.self_attn.q_proj.weight", cfg) == "blk.7.attn_q.weight"
    assert gguf_name("model.layers.0.mlp.down_proj.weight", cfg) == "blk.0.ffn_down.weight"
    assert gguf_name("model.layers.3.post_attention_layernorm.weight", cfg) == \
        "blk.3.ffn_norm.weight"
    assert gguf_name("model.layers.1.self_attn.k_proj.bias", cfg) == "blk.1.attn_k.bias"
    assert gguf_name("model.embed_tokens.weight", cfg) == "token_embd.weight"
    assert gguf_name("lm_head.weight", cfg) is None
    assert gguf_name("lm_head.weight", {**cfg, "tie_word_embeddings": False}) == "output.weight"
    with pytest.raises(ConfigError):
        gguf_name("model.layers.0.mlp.experts.0.w1.weight", cfg)
    assert (size_label(134515008), size_label(115008), size_label(7_241_732_096)) == \
        ("135M", "115K", "7.2B")
    assert {k: file_type(k) for k in FILE_TYPES} == {
        k: int(gguf.LlamaFileType[("ALL_" if k == "F32" else "MOSTLY_") + k]) for k in FILE_TYPES}


def test_fallbacks():
    assert [fallback(t, 576) for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")] == \
        ["Q4_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0", "Q8_0"]
    assert [fallback(t, 1536) for t in ("Q4_K", "Q6_K")] == ["Q4_K", "Q6_K"]
    assert [fallback(t, 48) for t in ("Q4_K", "Q8_0", "Q4_0")] == ["F16", "F16", "F16"]


# --------------------------------------------------------------------------------- mixtures

def smollm2_tensors() -> list[tuple[str, tuple]]:
    """The F16 GGUF of SmolLM2-135M: 30 layers, 576 wide, ffn 1536, 9/3 heads, tied, 49152."""
    out = [("token_embd.weight", (576, 49152)), ("output_norm.weight", (576,))]
    for i in range(30):
        out += [(f"blk.{i}.{n}.weight", ne) for n, ne in (
            ("attn_norm", (576,)), ("ffn_norm", (576,)), ("attn_q", (576, 576)),
            ("attn_k", (576, 192)), ("attn_v", (576, 192)), ("attn_output", (576, 576)),
            ("ffn_gate", (576, 1536)), ("ffn_up", (576, 1536)), ("ffn_down", (1536, 576)))]
    return out


# use_more_bits(i, 30): i < 3, i >= 26, or (i - 3) % 3 == 2
MORE = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}


def _pick(cond, yes: str, no: str):
    return lambda i: yes if cond(i) else no


# Read off llama-quant.cpp for these shapes: every 576-wide row misses the 256 block, so
# k-quants fall back (Q2_K/Q3_K → Q4_0, Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0); ffn_down rows
# are 1536 wide and keep their k-quant; the tied token_embd takes the output rule
# (576 % 256 ≠ 0 → Q8_0).
# n_gqa = 3 < 4, so Q2_K's attn_v is Q3_K (→ Q4_0).
SMOLLM2_EXPECTED = {
    "Q4_K_M": {"token_embd": "Q8_0", "rest": "Q5_0",
               "attn_v": _pick(MORE.__contains__, "Q8_0", "Q5_0"),
               "ffn_down": _pick(MORE.__contains__, "Q6_K", "Q4_K")},
    "Q5_K_M": {"token_embd": "Q8_0", "rest": "Q5_1",
               "attn_v": _pick(MORE.__contains__, "Q8_0", "Q5_1"),
               "ffn_down": _pick(MORE.__contains__, "Q6_K", "Q5_K")},
    "Q3_K_M": {"token_embd": "Q8_0", "rest": "Q4_0", "attn_output": "Q5_0",
               "attn_v": _pick(lambda i: i < 2, "Q5_1", "Q5_0"),
               "ffn_down": _pick(lambda i: i < 1, "Q5_K", "Q4_K")},
    "Q2_K": {"token_embd": "Q8_0", "rest": "Q4_0", "ffn_down": "Q3_K"},
    "Q4_K_S": {"token_embd": "Q8_0", "rest": "Q5_0",
               "attn_v": _pick(lambda i: i < 4, "Q5_1", "Q5_0"),
               "ffn_down": _pick(lambda i: i < 3, "Q5_K", "Q4_K")},
    "Q6_K": {"token_embd": "Q8_0", "rest": "Q8_0", "ffn_down": "Q6_K"},
    "Q8_0": {"token_embd": "Q8_0", "rest": "Q8_0", "ffn_down": "Q8_0"},
    "Q4_0": {"token_embd": "Q8_0", "rest": "Q4_0", "ffn_down": "Q4_0"},
    "F16": {"token_embd": "F16", "rest": "F16", "ffn_down": "F16"},
}


@pytest.mark.parametrize("ftype", sorted(SMOLLM2_EXPECTED))
def test_mixture_table_on_smollm2_shapes(ftype):
    spec = SMOLLM2_EXPECTED[ftype]
    got = tensor_types(ftype, smollm2_tensors(), 30, n_head=9, n_head_kv=3)
    for name, ne in smollm2_tensors():
        kind = name.split(".")[-2]
        if len(ne) == 1:
            want = "F32"
        elif kind == "token_embd":
            want = spec["token_embd"]
        else:
            rule = spec.get(kind, spec["rest"])
            want = rule(int(name.split(".")[1])) if callable(rule) else rule
        assert got[name] == want, (ftype, name)


def _quantized_types(llamacpp, src: Path, ftype: str, out: Path) -> dict[str, str]:
    import os

    # LD_LIBRARY_PATH: a build copied out of its build tree may still carry that tree's RUNPATH
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(
        p for p in (str(llamacpp.bin_dir), os.environ.get("LD_LIBRARY_PATH")) if p)}
    proc = subprocess.run([str(llamacpp.tool("llama-quantize")), str(src), str(out), ftype, "2"],
                          capture_output=True, text=True, timeout=600, env=env,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}


def _cross_check(llamacpp, reader: gguf.GGUFReader, src: Path, tmp_path: Path,
                 ftypes: Sequence[str]) -> None:
    def field(key: str):
        return reader.fields[key].contents()

    tensors = [(t.name, tuple(int(d) for d in t.shape)) for t in reader.tensors]
    for ftype in ftypes:
        out = tmp_path / f"{ftype}.gguf"
        theirs = _quantized_types(llamacpp, src, ftype, out)
        ours = tensor_types(ftype, tensors, field("llama.block_count"),
                            n_head=field("llama.attention.head_count"),
                            n_head_kv=field("llama.attention.head_count_kv"))
        assert ours == theirs, ftype
        assert gguf.GGUFReader(str(out)).fields["general.file_type"].contents() == \
            file_type(ftype)
        out.unlink()


@pytest.mark.slow
def test_mixtures_match_llama_quantize_on_sample(llamacpp, converter, tmp_path):
    """Mixtures with different rules on the sample's shapes (576-wide rows fall back; all 16
    are checked on the tiny shapes below)."""
    if not (SAMPLE_DIR / "tokenizer.json").is_file():
        pytest.skip(f"the sample model is not cached at {SAMPLE_DIR}")
    src = tmp_path / "f16.gguf"
    _cross_check(llamacpp, convert(converter, SAMPLE_DIR, src), src, tmp_path,
                 ["Q4_K_M", "Q3_K_M", "Q2_K", "Q4_0"])


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["wide", "odd"])
def test_mixtures_match_llama_quantize_on_tiny_shapes(shape, llamacpp, converter, tmp_path):
    """256-wide rows (no fallback; 16 layers, n_gqa 4, untied) and 48-wide rows (nothing fits
    a 32 block: everything falls back to F16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import make_tokenizer

    hidden, ffn, layers, tied = (256, 512, 16, False) if shape == "wide" else (48, 80, 3, True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=ffn,
                      num_hidden_layers=layers, num_attention_heads=8 if shape == "wide" else 4,
                      num_key_value_heads=2, tie_word_embeddings=tied, bos_token_id=0,
                      eos_token_id=1)
    model_dir = tmp_path / shape
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(str(model_dir))
    make_tokenizer(model_dir)
    src = tmp_path / "f16.gguf"
    _cross_check(llamacpp, convert(converter, model_dir, src), src, tmp_path,
                 [f for f in FILE_TYPES if f != "F32"])
