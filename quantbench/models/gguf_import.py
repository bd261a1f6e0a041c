"""Turn a llama-family GGUF file into an FP16 Hugging Face checkpoint (used for the sample)."""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import save_file

from quantbench.errors import ModelLoadError
from quantbench.models.arch import LLAMA

log = logging.getLogger(__name__)

# llama.cpp name → HF name, from the architecture's data (quantbench/models/arch.py)
BLOCK_NAMES = {gg: hf for hf, gg in LLAMA.gguf_names}          # "attn_q" → "self_attn.q_proj"
TOP_NAMES = {gg: hf for hf, gg in LLAMA.gguf_top_names()}      # "token_embd" → "model.embed_tokens"


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotary layout (halves) → llama.cpp layout (interleaved pairs), rows only."""
    rows = w.shape[0]
    return (w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of ``permute_qk``."""
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def hf_name(gguf_name: str) -> str:
    """llama.cpp tensor name → HF name for the llama family (``blk.3.attn_q.weight`` →
    ``model.layers.3.self_attn.q_proj.weight``)."""
    return LLAMA.hf_tensor_name(gguf_name)


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _open(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as exc:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({exc}); re-download it") from exc


def hf_config_from_gguf(reader) -> dict[str, Any]:
    from transformers import LlamaConfig

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(
            f"GGUF architecture {arch!r} is not supported for import; only 'llama' is")
    key = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    n_head = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = key("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    cfg = LlamaConfig(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")), num_attention_heads=n_head,
        num_key_value_heads=int(key("attention.head_count_kv", n_head)),
        head_dim=int(key("rope.dimension_count", hidden // n_head)),
        max_position_embeddings=int(key("context_length", 2048)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        hidden_act="silu", architectures=["LlamaForCausalLM"],
    )
    config = cfg.to_dict()
    config["dtype"] = "float16"
    config.pop("transformers_version", None)
    return config


def read_gguf_tensors(reader, config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor, str]]:
    """``(hf_name, float32 tensor [HF shape], ggml type name)`` for every tensor, Q/K unpermuted."""
    from gguf.quants import dequantize

    heads = {"self_attn.q_proj": config["num_attention_heads"],
             "self_attn.k_proj": config["num_key_value_heads"]}
    for t in reader.tensors:
        array = dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ne[0] is innermost
        w = torch.from_numpy(np.array(array, dtype=np.float32)).reshape(shape)
        name = hf_name(t.name)
        for module, n in heads.items():
            if f".{module}." in name:
                w = unpermute_qk(w, n)
        yield name, w, t.tensor_type.name


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.float16,
                       tokenizer: bool = True) -> dict[str, Any]:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = _open(gguf_path)
    config = hf_config_from_gguf(reader)
    out_dir.mkdir(parents=True, exist_ok=True)
    types: Counter[str] = Counter()
    tensors = {}
    for name, w, ggml_type in read_gguf_tensors(reader, config):
        tensors[name] = w.to(dtype).contiguous()
        types[ggml_type] += 1
    save_file(tensors, str(out_dir / "model.safetensors"), {"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if config.get(k) is not None}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer:
        _write_tokenizer(gguf_path, out_dir)
    return {"gguf_types": dict(types), "general_name": _field(reader, "general.name"),
            "license": _field(reader, "general.license")}


def _write_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:  # transformers wants a directory + file name
        link = Path(tmp) / gguf_path.name
        try:
            link.symlink_to(gguf_path.resolve())
        except OSError:
            shutil.copy2(gguf_path, link)
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_path.name)
        tok.save_pretrained(str(out_dir))


def cached_hf_checkpoint(gguf_path: Path) -> Path:
    """An FP16 HF checkpoint of a GGUF file (dequantized), built once into the user cache,
    keyed by the file's sha256, so a GGUF can be a source like any checkpoint directory."""
    from quantbench.formats.manifest import sha256_file
    from quantbench.models.sample import cache_root

    gguf_path = Path(gguf_path)
    target = cache_root() / "gguf" / sha256_file(gguf_path)[:24]
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=target.parent) as tmp:
        out = Path(tmp) / "model"
        info = convert_gguf_to_hf(gguf_path, out)
        log.info("imported %s (%s) as an FP16 checkpoint", gguf_path.name, info["gguf_types"])
        if not target.exists():
            Path(out).rename(target)
    return target
