"""The ``tokenizer.*`` GGUF keys llama.cpp's converter writes, from the HF tokenizer files.

Three vocabularies, tried in the converter's order for llama-arch models:

* SentencePiece ``tokenizer.model`` → ``tokenizer.ggml.model = "llama"`` with scores and token
  types (read with a small protobuf reader; the ``sentencepiece`` package is not needed);
* a SentencePiece-style byte-fallback BPE ``tokenizer.json`` (Llama 2 / Mistral saved by recent
  transformers) → ``"llama"`` with gguf-py's ``LlamaHfVocab`` scores (all -1000) and types;
* any other BPE ``tokenizer.json`` → ``"gpt2"`` with merges and ``tokenizer.ggml.pre``, the
  pre-tokenizer llama.cpp recognises by hashing the token ids of a fixed test string.

Plus the special token ids, ``add_*_token`` flags and the chat template (gguf-py's
``SpecialVocab``). Only JSON and protobuf are parsed; no remote code, no pickles.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gguf import GGUFValueType as VT

from quantbench.errors import ConfigError, FormatError
from quantbench.formats.gguf_kv import KV, gguf_arch, read_json
from quantbench.formats.gguf_special import SPECIAL_TYPES, special_metadata
from quantbench.models.arch import arch_of

log = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf TokenType
# convert_hf_to_gguf.py's get_vocab_base_pre: the test string and the sha256 of its token ids
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis '
          'concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 '
          'កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български '
          '\'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you '
          'sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {  # the llama/mistral/qwen2-family entries of llama.cpp's table
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",
}


def tokenizer_metadata(model_dir: Path, config: dict,
                       unknown_pre: str | None = "default") -> list[KV]:
    """The ``tokenizer.*`` keys, in the converter's order. A BPE pre-tokenizer llama.cpp does not
    know becomes ``unknown_pre`` (llama.cpp's converter refuses it; None raises ConfigError)."""
    model_dir, arch = Path(model_dir), gguf_arch(config)
    tok_cfg = read_json(model_dir / "tokenizer_config.json")
    kvs = []
    if arch == "llama" and isinstance((tok_cfg or {}).get("add_prefix_space"), bool):
        kvs.append(KV("tokenizer.ggml.add_space_prefix", tok_cfg["add_prefix_space"], VT.BOOL))
    tok_json = read_json(model_dir / "tokenizer.json")
    if (model_dir / "tokenizer.model").is_file():
        vocab = ("llama", "default", *spm_vocab(model_dir, config))
    elif arch == "llama" and tok_json is not None and is_llama_hf(tok_json):
        vocab = ("llama", "default", *llama_hf_vocab(tok_json, tok_cfg or {}))
    elif tok_json is not None:
        tokens, types = bpe_vocab(tok_json, config)
        pre = bpe_pre_tokenizer(model_dir) or _unknown_pre(unknown_pre)
        vocab = ("gpt2", pre, tokens, None, types)
    else:
        raise ConfigError(f"{model_dir} has neither tokenizer.json nor tokenizer.model")
    kvs += _vocab_kvs(*vocab)
    spm = vocab[0] == "llama"  # SentencePiece-style: ids checked against the vocab, no merges
    kvs += special_metadata(model_dir, load_merges=not spm,
                            n_vocab=len(vocab[2]) if spm else None)
    space = arch_of(config).gguf_spm_space_prefix
    if spm and space is not None:
        kvs = _set(kvs, KV("tokenizer.ggml.add_space_prefix", space, VT.BOOL))
    if arch == "llama" and config.get("vocab_size") == 49152:  # the converter's Granite rule,
        kvs = _set(kvs, KV("tokenizer.ggml.add_bos_token", False, VT.BOOL))  # SmolLM hits it too
    return kvs


def _set(kvs: list[KV], kv: KV) -> list[KV]:
    """Overwrite a key in place, or append it (gguf-py's add_key_value on a dict)."""
    keys = [k.key for k in kvs]
    if kv.key not in keys:
        return kvs + [kv]
    return [kv if k.key == kv.key else k for k in kvs]


def _unknown_pre(unknown_pre: str | None) -> str:
    if unknown_pre is None:
        raise ConfigError("llama.cpp does not know this BPE pre-tokenizer (its hash is not in "
                          "convert_hf_to_gguf.py's table)")
    log.warning("BPE pre-tokenizer not recognised by llama.cpp; writing %r", unknown_pre)
    return unknown_pre


def _vocab_kvs(model: str, pre: str, tokens: list[str], scores: list[float] | None,
               types: list[int]) -> list[KV]:
    kvs = [KV("tokenizer.ggml.model", model, VT.STRING),
           KV("tokenizer.ggml.pre", pre, VT.STRING),
           KV("tokenizer.ggml.tokens", tokens, VT.ARRAY, VT.STRING)]
    if scores is not None:
        kvs.append(KV("tokenizer.ggml.scores", scores, VT.ARRAY, VT.FLOAT32))
    return kvs + [KV("tokenizer.ggml.token_type", types, VT.ARRAY, VT.INT32)]


def bpe_pre_tokenizer(model_dir: Path) -> str | None:
    """llama.cpp's name for the BPE pre-tokenizer of ``tokenizer.json`` (sha256 of the token ids
    of CHKTXT, special tokens added as the tokenizer adds them), or None when unknown."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    digest = hashlib.sha256(str(tok.encode(CHKTXT).ids).encode()).hexdigest()
    log.debug("BPE pre-tokenizer hash %s", digest)
    return PRE_TOKENIZERS.get(digest) or _plain_gpt2(model_dir)


def _plain_gpt2(model_dir: Path) -> str | None:
    """"gpt-2" for a tokenizer whose only pre-tokenizer is GPT-2's own byte-level regex split
    (llama.cpp splits such text identically; its "default" would not, e.g. " =")."""
    pre = (json.loads((Path(model_dir) / "tokenizer.json").read_text()).get("pre_tokenizer")
           or {})
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return None


def looks_special(token: str) -> bool:
    """The converter's guess for added tokens that ought to be control tokens."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def bpe_vocab(tok_json: dict, config: dict) -> tuple[list[str], list[int]]:
    """Tokens and token types of a GPT-2-style vocabulary (``get_vocab_base``), padded to the
    config's ``vocab_size`` with ``[PAD<i>]`` UNUSED entries."""
    by_id = {i: t for t, i in tok_json["model"]["vocab"].items()}
    added = {a["id"]: a for a in tok_json.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    tokens, types = [], []
    for i in range(int(config.get("vocab_size", len(by_id)))):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added and (added[i].get("special") or looks_special(token)):
            tokens.append(token)
            types.append(CONTROL)
        elif i in added:
            tokens.append(token.replace("\u2581", " "))
            types.append(USER_DEFINED)
        else:
            tokens.append(token)
            types.append(NORMAL)
    return tokens, types


def is_llama_hf(tok_json: dict) -> bool:
    """gguf-py's LlamaHfVocab test: a byte-fallback BPE with a Sequence decoder (not Llama 3)."""
    model = tok_json.get("model", {})
    return (model.get("type") == "BPE" and bool(model.get("byte_fallback", False))
            and (tok_json.get("decoder") or {}).get("type") == "Sequence")


def llama_hf_vocab(tok_json: dict, tok_cfg: dict) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores (-1000, as gguf-py writes) and types of a byte-fallback BPE tokenizer.json:
    ``<0xXX>`` tokens are BYTE, named special tokens CONTROL, tokens added beyond the model's
    vocabulary USER_DEFINED (or CONTROL when named special) and appended after it."""
    vocab = tok_json["model"]["vocab"]
    n_base = len(vocab)
    added = sorted((a["id"], a["content"]) for a in tok_json.get("added_tokens", []))
    extra = [(i, t) for i, t in added if i >= n_base]
    every = {**vocab, **{t: i for i, t in added}}
    special_ids = {every[t] for t in _named_special_tokens(tok_cfg) if t in every}
    by_id = {i: t for t, i in vocab.items()}
    extra_ids = {i for i, _ in extra}
    tokens, types = [], []
    for i in range(n_base):
        if i in extra_ids:
            continue
        tokens.append(by_id[i])
        types.append(BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", by_id[i])
                     else CONTROL if i in special_ids else NORMAL)
    for i, text in extra:
        tokens.append(text)
        types.append(CONTROL if i in special_ids else USER_DEFINED)
    return tokens, [-1000.0] * len(tokens), types


def _named_special_tokens(tok_cfg: dict) -> list[str]:
    """transformers' ``all_special_tokens``: the named special tokens and the extra ones."""
    names = [tok_cfg.get(f"{t}_token") for t in SPECIAL_TYPES]
    names += list(tok_cfg.get("extra_special_tokens") or tok_cfg.get("additional_special_tokens")
                  or [])
    return [n.get("content") if isinstance(n, dict) else n for n in names if n]


# ------------------------------------------------------------------- SentencePiece (protobuf)

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """``(field number, value)`` of a protobuf message; values are ints or raw bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise FormatError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def spm_pieces(path: Path) -> list[tuple[str, float, int]]:
    """``(piece, score, sentencepiece type)`` of every piece of a ``tokenizer.model``
    (ModelProto field 1; type 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)."""
    pieces = []
    try:
        for number, value in _fields(Path(path).read_bytes()):
            if number != 1 or isinstance(value, int):
                continue
            piece, score, kind = "", 0.0, NORMAL
            for n, v in _fields(value):
                if n == 1:
                    piece = v.decode("utf-8")
                elif n == 2:
                    score = struct.unpack("<f", v)[0]
                elif n == 3:
                    kind = v
            pieces.append((piece, score, kind))
    except (IndexError, UnicodeDecodeError, struct.error) as exc:
        raise FormatError(f"{path} is not a SentencePiece model ({exc})") from exc
    return pieces


def spm_vocab(model_dir: Path, config: dict) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types as ``_create_vocab_sentencepiece`` builds them: pieces of
    tokenizer.model (user-defined pieces count as NORMAL), then added_tokens.json and the
    tokenizer_config's ``added_tokens_decoder`` overriding entries, padded to ``vocab_size``."""
    pieces = spm_pieces(Path(model_dir) / "tokenizer.model")
    size = int(config.get("vocab_size") or len(pieces))
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores, types = [-10000.0] * size, [UNUSED] * size
    for i, (piece, score, kind) in enumerate(pieces[:size]):
        tokens[i], scores[i] = piece, score
        types[i] = kind if kind in (UNKNOWN, CONTROL, UNUSED, BYTE) else NORMAL
    for text, i in (read_json(Path(model_dir) / "added_tokens.json") or {}).items():
        if i < size:
            tokens[i], scores[i], types[i] = text, -1000.0, USER_DEFINED
    decoder = (read_json(Path(model_dir) / "tokenizer_config.json") or {}).get(
        "added_tokens_decoder", {})
    for key, data in decoder.items():
        i, text = int(key), data["content"]
        if i >= size:
            continue
        special = data.get("special") or looks_special(text)
        tokens[i] = text if special else text.replace("\u2581", " ")
        scores[i], types[i] = -1000.0, CONTROL if special else USER_DEFINED
    return tokens, scores, types
