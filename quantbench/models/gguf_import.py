"""Turn a llama-family GGUF file (GGUF arch ``llama`` — llama, mistral, and Mixtral when it has
``llama.expert_count`` — ``qwen2``, ``qwen3``, ``qwen3moe``, ...) into an FP16 Hugging Face
checkpoint: the sample, and any such GGUF given as a source, including files made by llama.cpp
(RoPE scaling keys and llama3's ``rope_freqs`` tensor read back into the config; a
mixture-of-experts block's stacked ``ffn_*_exps`` tensors split into one tensor per expert)."""
from __future__ import annotations

import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterator


from quantbench.errors import ModelLoadError
from quantbench.formats.gguf_meta import permute_qk, unpermute_qk  # noqa: F401  (re-exported)
from quantbench.jsonfile import NonFiniteJSON, dumps
from quantbench.lazy import numpy as np, torch
from quantbench.models.arch import ARCHITECTURES, LLAMA, ArchSpec

log = logging.getLogger(__name__)

# llama.cpp name → HF name, from the architecture's data (quantbench/models/arch.py)
BLOCK_NAMES = {gg: hf for hf, gg in LLAMA.gguf_names}          # "attn_q" → "self_attn.q_proj"
TOP_NAMES = {gg: hf for hf, gg in LLAMA.gguf_top_names()}      # "token_embd" → "model.embed_tokens"


def hf_name(gguf_name: str) -> str:
    """llama.cpp tensor name → HF name for the llama family (``blk.3.attn_q.weight`` →
    ``model.layers.3.self_attn.q_proj.weight``; qwen2 shares these names)."""
    return LLAMA.hf_tensor_name(gguf_name)


GENERATED = ("rope_freqs.weight",)  # llama.cpp-made tensors the HF config stands for


def generated_names(spec: ArchSpec) -> tuple[str, ...]:
    """The GGUF tensors of a file of this family that the HF config stands for (read into it,
    not as weights): llama3's ``rope_freqs`` and the family's ``ArchSpec.gguf_generated``."""
    return GENERATED + spec.gguf_generated


def gguf_arch_spec(arch: str | None, expert_count: int = 0) -> ArchSpec:
    """The family a GGUF architecture reads back as: llama.cpp's ``llama`` holds Mixtral too,
    told apart by its ``expert_count`` (a family with experts for a count above 0)."""
    specs = [spec for spec in ARCHITECTURES if spec.gguf_arch == arch]
    if not specs:
        known = sorted({spec.gguf_arch for spec in ARCHITECTURES})
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported for import; "
                             f"quantbench reads {', '.join(repr(a) for a in known)} GGUF files")
    return next((s for s in specs if (s.experts is not None) == (expert_count > 0)), specs[0])


def tensor_parts(reader, spec: ArchSpec) -> dict[str, tuple[Any, int | None]]:
    """``{HF name: (GGUF tensor of reader, expert index or None)}`` for the file's weights
    (not the tensors the config stands for): a stacked ``ffn_*_exps`` tensor gives one entry
    per expert (``spec`` expanded by ``arch_of``). ModelLoadError for a name the family does
    not have, or a stacked tensor that is not 3-D."""
    from quantbench.formats.gguf_kv import expert_part, hf_tensor_names

    out: dict[str, tuple[Any, int | None]] = {}
    for t in reader.tensors:
        if t.name in generated_names(spec):
            continue
        first = hf_tensor_names(spec, t.name, 1)[0]
        if expert_part(spec, first) is None:
            out[first] = (t, None)
            continue
        if len(t.shape) != 3:
            raise ModelLoadError(f"tensor {t.name} has {len(t.shape)} dimensions; llama.cpp "
                                 "stores a block's experts as one 3-D tensor: the file is "
                                 "corrupted")
        for e, name in enumerate(hf_tensor_names(spec, t.name, int(t.shape[2]))):
            out[name] = (t, e)
    return out


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _open(path: Path):
    """gguf-py's reader over ``path``, after our bounded header walk (``gguf_check``): no
    count or length in the file can send the reader past its end."""
    import struct

    import gguf

    from quantbench.formats.gguf_check import check_gguf

    check_gguf(path, ModelLoadError)
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError, struct.error) as exc:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({exc}); re-download it") from exc


# HF config key → the GGUF metadata key it comes from (``<arch>.`` prefixed), for messages
GGUF_KEYS = {"hidden_size": "embedding_length", "num_hidden_layers": "block_count",
             "intermediate_size": "feed_forward_length",
             "num_attention_heads": "attention.head_count",
             "num_key_value_heads": "attention.head_count_kv",
             "head_dim": "attention.key_length", "vocab_size": "vocab_size",
             "rms_norm_eps": "attention.layer_norm_rms_epsilon",
             "rope_theta": "rope.freq_base", "rope_parameters.rope_theta": "rope.freq_base",
             "max_position_embeddings": "context_length",
             "num_local_experts": "expert_count", "num_experts": "expert_count",
             "num_experts_per_tok": "expert_used_count",
             "moe_intermediate_size": "expert_feed_forward_length"}


def _number(reader, key: str, kind: type, default: Any = None, positive: bool = False) -> Any:
    """Metadata ``key`` as ``kind`` (int or float); refuses a missing required key (no
    ``default``) or a value of another type, naming the key."""
    value = _field(reader, key)
    if value is None:
        if default is None:
            raise ModelLoadError(f"the GGUF metadata has no {key!r}, which the model needs; "
                                 "the file is incomplete: re-create it")
        return default
    numeric = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric) or (positive and value <= 0):
        raise ModelLoadError(f"GGUF metadata {key!r} is {value!r}, not a "
                             f"{'positive ' if positive else ''}{kind.__name__}; the file is "
                             "corrupted: re-create it")
    return kind(value)


def _token_id(reader, which: str, vocab: int) -> int | None:
    """A special token id (``tokenizer.ggml.<which>_token_id``) inside the vocabulary."""
    key = f"tokenizer.ggml.{which}_token_id"
    value = _field(reader, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
        raise ModelLoadError(f"GGUF metadata {key!r} is {value!r}, not a token id of the "
                             f"vocabulary (0 to {vocab - 1}); the file is corrupted: re-create "
                             "it")
    return value


def hf_config_from_gguf(reader, where: str = "", full: bool = True) -> dict[str, Any]:
    """The HF ``config.json`` a GGUF's ``<arch>.*`` metadata stands for (GGUF arch ``llama`` →
    LlamaConfig, ``qwen2`` → Qwen2Config), after checking that the file's tensors are exactly
    the ones it implies (:func:`check_gguf_tensors`); ``where`` prefixes refusals.

    ``full=False``: only the keys the metadata gives (and ``model_type``), checked as the
    config class checks them, without building it (transformers' configs import torch):
    enough to check the tensors and describe the file (``quantbench inspect``)."""
    from quantbench.models.arch import arch_of

    try:
        config = _config_from_metadata(reader, full)
        check_gguf_tensors(reader, config, arch_of(config))
    except ModelLoadError as exc:
        raise ModelLoadError(f"{where}: {exc}" if where else str(exc)) from exc
    config.pop("gguf_arch")
    return config


def _config_from_metadata(reader, full: bool = True) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    count = lambda k, d=None: _number(reader, f"{arch}.{k}", int, d, positive=True)  # noqa: E731
    spec = gguf_arch_spec(arch, _number(reader, f"{arch}.expert_count", int, 0))
    real = lambda k, d: _number(reader, f"{arch}.{k}", float, d)  # noqa: E731
    n_head = count("attention.head_count")
    hidden = count("embedding_length")
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    vocab = count("vocab_size", len(tokens) or None)
    theta = real("rope.freq_base", 10000.0)
    head_dim = count("attention.key_length", 0) or count("rope.dimension_count", 0) or \
        hidden // n_head
    _check_head_sizes(arch, head_dim, count("attention.value_length", 0),
                      count("rope.dimension_count", 0))
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=count("feed_forward_length"),
        num_hidden_layers=count("block_count"), num_attention_heads=n_head,
        num_key_value_heads=count("attention.head_count_kv", n_head),
        max_position_embeddings=count("context_length", 2048),
        rms_norm_eps=real("attention.layer_norm_rms_epsilon", 1e-5),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_token_id(reader, "bos", vocab),
        eos_token_id=_token_id(reader, "eos", vocab),
        pad_token_id=_token_id(reader, "padding", vocab),
        hidden_act="silu")
    rope = _rope_parameters(reader, arch, theta, head_dim)
    kwargs.update({"rope_parameters": rope} if rope else {"rope_theta": theta})
    if spec.experts is not None:
        kwargs.update(_expert_config(spec, arch, count))
    if spec.gguf_config is not None:  # the family's own entries (models/families/<family>.py)
        spec.gguf_config(Metadata(reader, arch, names, head_dim), kwargs)
    try:  # the config class checks the values against each other (heads dividing hidden, ...)
        config = _config_class(spec, kwargs) if full else _checked_keys(spec, kwargs)
    except _invalid_values() as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ModelLoadError(f"the GGUF metadata describes no valid {arch} model "
                             f"({lines[-1] if lines else type(exc).__name__}); the file is "
                             "corrupted: re-create it") from exc
    config["dtype"] = "float16"
    config.pop("transformers_version", None)
    config["gguf_arch"] = arch
    return config


def _expert_config(spec: ArchSpec, arch: str, count) -> dict[str, Any]:
    """A mixture-of-experts family's config entries: expert count, experts per token, the
    experts' width (``expert_feed_forward_length``, or ``feed_forward_length`` where the
    family's experts are ``intermediate_size`` wide: Mixtral), and top-k renormalisation on
    (llama.cpp's llama and qwen3moe always renormalise the k routing weights)."""
    experts = spec.experts
    n, used = count("expert_count"), count("expert_used_count")
    if used > n:
        raise ModelLoadError(f"GGUF metadata {arch}.expert_used_count is {used}, more than "
                             f"{arch}.expert_count ({n}); the file is corrupted: re-create it")
    out = {experts.count_keys[0]: n, experts.top_k_key: used}
    if experts.size_key != "intermediate_size":
        out[experts.size_key] = count("expert_feed_forward_length")
    if experts.normalize_key is not None:
        out[experts.normalize_key] = True
    return out


def _check_head_sizes(arch: str, head_dim: int, value_length: int, rotary: int) -> None:
    """One head size for keys and values (what the HF configs of every supported family
    hold), and rotary dimensions that fit in it (llama.cpp asserts the same at load)."""
    if value_length and value_length != head_dim:
        raise ModelLoadError(f"GGUF metadata {arch}.attention.value_length is {value_length} "
                             f"but the key head size is {head_dim}; no supported {arch} model "
                             "has different key and value head sizes: the file is corrupted, "
                             "re-create it")
    if rotary:
        check_rotary(arch, rotary, head_dim)


def check_rotary(arch: str, rotary: int, head_dim: int) -> None:
    """``<arch>.rope.dimension_count``: even and no more than the head size."""
    if rotary > head_dim or rotary % 2:
        raise ModelLoadError(f"GGUF metadata {arch}.rope.dimension_count is {rotary}, "
                             f"{'odd' if rotary % 2 else 'more than the head size'} "
                             f"({head_dim}); the file is corrupted: re-create it")


def _invalid_values() -> tuple[type[Exception], ...]:
    """What a config class raises for values it refuses (evaluated only when one is raised:
    huggingface_hub's errors take a while to import)."""
    from huggingface_hub.errors import StrictDataclassError

    return (ValueError, TypeError, StrictDataclassError)


class Metadata:
    """What a family's ``ArchSpec.gguf_config`` hook reads: ``field(key)`` (raw),
    ``count(key, default)`` / ``real(key, default)`` (``<arch>.`` prefixed, type-checked),
    ``rotary_dims(head_dim)``, ``names`` (the file's tensor names), ``head_dim``."""

    def __init__(self, reader, arch: str, names: set[str], head_dim: int):
        self.reader, self.arch, self.names, self.head_dim = reader, arch, names, head_dim

    def field(self, key: str, default: Any = None) -> Any:
        return _field(self.reader, key, default)

    def count(self, key: str, default: Any = None) -> int:
        return _number(self.reader, f"{self.arch}.{key}", int, default, positive=True)

    def real(self, key: str, default: Any = None) -> float:
        return _number(self.reader, f"{self.arch}.{key}", float, default)

    def rotary_dims(self, head_dim: int) -> int:
        """``rope.dimension_count`` (default ``head_dim``), checked against ``head_dim``."""
        rotary = self.count("rope.dimension_count", head_dim)
        check_rotary(self.arch, rotary, head_dim)
        return rotary

    def floats(self, name: str) -> np.ndarray | None:
        """The values of the F32 tensor ``name`` (a generated one: ``ArchSpec.gguf_generated``),
        None when the file has none; refuses another type."""
        t = next((t for t in self.reader.tensors if t.name == name), None)
        if t is None:
            return None
        if t.tensor_type.name != "F32":
            raise ModelLoadError(f"tensor {name} is {t.tensor_type.name}; llama.cpp stores it "
                                 "as F32: the file is corrupted")
        return np.asarray(t.data, dtype=np.float32).reshape(-1)


def _config_class(spec: ArchSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
    """transformers' config class of the family (``ArchSpec.hf_classes``) of ``kwargs``, as a
    dict."""
    import transformers

    config_cls, model_cls = spec.hf_classes
    return getattr(transformers, config_cls)(architectures=[model_cls], **kwargs).to_dict()


def _checked_keys(spec: ArchSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the ``model_type`` :func:`_config_class` would give, refused where its
    class would refuse them (LlamaConfig: heads dividing the hidden size; the other values
    are checked by ``_number``/``_token_id`` and the tensor check), without transformers."""
    if spec.hf_classes[0] == "LlamaConfig" and \
            kwargs["hidden_size"] % kwargs["num_attention_heads"]:
        raise ValueError(f"The hidden size ({kwargs['hidden_size']}) is not a multiple of the "
                         f"number of attention heads ({kwargs['num_attention_heads']}).")
    return {"model_type": spec.model_types[0], **kwargs}


def check_gguf_tensors(reader, config: dict[str, Any], spec: ArchSpec) -> None:
    """The file's tensors are exactly those its metadata implies (block_count, embedding
    length, heads, kv heads, feed-forward length, vocabulary), with those shapes: a file
    declaring fewer tensors or blocks is refused, never read as a smaller model. The same
    expectation as for HF checkpoints (``models/validate.py``), named in GGUF terms."""
    from quantbench.models.validate import Context, check_tensors

    arch = spec.gguf_arch
    ctx = Context("", show=lambda n: _gguf_name(spec, n), config_file="the GGUF metadata",
                  keys={**{k: f"{arch}.{v}" for k, v in GGUF_KEYS.items()},
                        "tie_word_embeddings": "the absence of output.weight"})
    try:
        parts = tensor_parts(reader, spec)
    except ModelLoadError as exc:
        raise ctx.fail(str(exc)) from exc
    shapes = {name: part_shape(t, e) for name, (t, e) in parts.items()}
    check_tensors(config, spec, shapes, ctx)


def part_shape(t, expert: int | None) -> tuple[int, ...]:
    """The HF shape of a GGUF tensor (``ne`` reversed: ``ne[0]`` is innermost), or of one
    expert's part of a stacked one."""
    return tuple(int(d) for d in reversed(t.shape[:2] if expert is not None else t.shape))


def _gguf_name(spec: ArchSpec, hf: str) -> str:
    from quantbench.formats.gguf_kv import expert_part, gguf_tensor_name

    try:
        part = expert_part(spec, hf)
        return f"{part[0]} (expert {part[1]})" if part else gguf_tensor_name(spec, hf)
    except ModelLoadError:
        return hf


def _rope_parameters(reader, arch: str, theta: float, head_dim: int) -> dict[str, Any] | None:
    """RoPE scaling as transformers' ``rope_parameters``: from ``rope.scaling.*`` (linear,
    yarn) or, for llama3 scaling, recovered from the ``rope_freqs`` tensor (which is all
    llama.cpp keeps of it). None when unscaled."""
    def real(k: str, default: Any = None) -> Any:
        return _number(reader, f"{arch}.rope.scaling.{k}", float, default)

    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": real("factor")}
    if kind == "yarn":
        rope = {"rope_type": "yarn", "rope_theta": theta, "factor": real("factor"),
                "original_max_position_embeddings": _number(
                    reader, f"{arch}.rope.scaling.original_context_length", int, positive=True)}
        for gg, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                       ("yarn_attn_factor", "attention_factor"),
                       ("yarn_ext_factor", "extrapolation_factor")):
            if _field(reader, f"{arch}.rope.scaling.{gg}") is not None:
                rope[hf] = real(gg)
        return rope
    if kind not in (None, "none"):
        raise ModelLoadError(f"GGUF RoPE scaling {kind!r} is not supported for import (linear, "
                             "yarn and llama3 are)")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is None:
        return None
    if int(freqs.n_elements) != head_dim // 2 or freqs.tensor_type.name != "F32":
        raise ModelLoadError(f"tensor rope_freqs.weight is {freqs.tensor_type.name} with "
                             f"{int(freqs.n_elements)} values; llama3 RoPE scaling stores "
                             f"{head_dim // 2} F32 values (half the head size): the file is "
                             "corrupted")
    return llama3_rope(np.asarray(freqs.data, dtype=np.float32).reshape(-1), theta, head_dim)


def llama3_rope(freqs: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """llama3 ``rope_parameters`` that regenerate ``freqs`` (llama.cpp's ``rope_freqs``). Only
    ``(old_ctx / (high - low), low / (high - low))`` shape the tensor, so ``low_freq_factor``
    1 and ``high_freq_factor`` 4 (every Llama 3.x) are tried first, then any exact fit."""
    from quantbench.formats.gguf_meta import rope_freqs

    factor = float(freqs.max())
    base = {"rope_type": "llama3", "rope_theta": theta, "factor": factor}
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * np.pi / inv
    mid = (freqs > 1.0) & (freqs < factor)
    # smooth = (1/f - 1/F) / (1 - 1/F) = old_ctx / (wavelen (h - l)) - l / (h - l)
    smooth = (1.0 / freqs[mid].astype(np.float64) - 1.0 / factor) / (1.0 - 1.0 / factor)
    candidates = []
    if mid.any():
        for low, high in ((1.0, 4.0), (1.0, 2.0)):
            ctx = np.median(wavelen[mid] * (smooth * (high - low) + low))
            candidates.append((low, high, int(round(ctx))))
        if mid.sum() >= 2:  # an exact line through two points of the smooth band
            a, b = np.polyfit(1.0 / wavelen[mid], smooth, 1)
            if b < 0:
                low = 1.0
                candidates.append((low, low - low / b, int(round(a * (-low / b)))))
    else:  # no band to read: the factors only say which wavelengths are scaled
        edge = wavelen[freqs >= factor].min() if (freqs >= factor).any() else None
        if edge is not None:
            candidates.append((1.0, 4.0, int(np.floor(edge)) - 1))
    config = {"rope_parameters": base, "head_dim": head_dim, "model_type": "llama"}
    for low, high, ctx in candidates:
        rope = {**base, "low_freq_factor": low, "high_freq_factor": float(high),
                "original_max_position_embeddings": ctx}
        config["rope_parameters"] = rope
        mine = rope_freqs(config)
        if mine is not None and np.allclose(mine.numpy(), freqs, rtol=1e-5, atol=0):
            return rope
    raise ModelLoadError("the GGUF's rope_freqs tensor does not match llama3 RoPE scaling; "
                         "quantbench cannot import this file")


def tensor_data(reader, t, start: int = 0, length: int | None = None) -> np.ndarray:
    """The stored data of GGUF tensor ``t`` (as ``t.data``: its dtype and shape), or the bytes
    ``start .. start+length`` of it, read from the file with a plain read: gguf-py's ``t.data``
    is a view of a memory map whose touched pages would stay in the process's resident memory
    (a whole multi-GB file by the end of a pass)."""
    from quantbench.models.weights import read_range

    count = int(t.n_bytes) - start if length is None else length
    try:
        buf = read_range(reader.data.filename, int(t.data_offset) + start, count)
    except ValueError:
        raise ModelLoadError(f"{reader.data.filename} ends inside tensor {t.name}; the file "
                             "is truncated: re-create or re-download it") from None
    if length is not None:
        return np.frombuffer(buf, dtype=np.uint8)
    return np.frombuffer(buf, dtype=t.data.dtype).reshape(t.data.shape)


def read_gguf_tensors(reader, config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor, str]]:
    """``(hf_name, float32 tensor [HF shape], ggml type name)`` for every tensor, Q/K
    unpermuted, a stacked expert tensor split per expert."""
    from gguf.quants import dequantize

    from quantbench.formats.gguf_meta import norm_offset, qk_permute_heads
    from quantbench.models.arch import arch_of

    whole: dict[str, torch.Tensor] = {}  # a stacked tensor, dequantized once for its experts
    for name, (t, e) in tensor_parts(reader, arch_of(config)).items():
        if t.name not in whole:
            whole.clear()
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ne[0] is innermost
            array = dequantize(tensor_data(reader, t), t.tensor_type)
            whole[t.name] = torch.from_numpy(np.array(array, dtype=np.float32)).reshape(shape)
        w = whole[t.name] if e is None else whole[t.name][e]
        heads = qk_permute_heads(config, name)
        w = unpermute_qk(w, heads) if heads else w
        offset = norm_offset(config, name)
        yield name, (w - offset if offset else w), t.tensor_type.name
        del w  # not held while the next tensor is dequantized


def hf_tensor_infos(reader, config: dict[str, Any], dtype: torch.dtype
                    ) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``(name, dtype, HF shape)`` of every tensor :func:`read_gguf_tensors` yields, in its
    order, under the names the family's checkpoints use (``ArchSpec.output_name``): known
    from the tensor infos before any data is read."""
    from quantbench.models.arch import arch_of

    spec = arch_of(config)
    return [(spec.output_name(name), dtype, part_shape(t, e))
            for name, (t, e) in tensor_parts(reader, spec).items()]


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, dtype: torch.dtype | None = None,
                       tokenizer: bool = True) -> dict[str, Any]:
    """Write config.json, model.safetensors (shards and their index past
    ``safetensors_writer.MAX_SHARD_BYTES``), generation_config.json and the tokenizer. The
    tensors stream to the file one at a time (a stacked expert tensor held while it is
    split): memory is the largest tensor, not the model."""
    from quantbench.models.arch import arch_of
    from quantbench.models.safetensors_writer import SafetensorsWriter

    dtype = dtype or torch.float16
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = _open(gguf_path)
    config = hf_config_from_gguf(reader, str(gguf_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    types: Counter[str] = Counter()
    output_name = arch_of(config).output_name  # the names the family's checkpoints use
    with SafetensorsWriter(out_dir, hf_tensor_infos(reader, config, dtype)) as writer:
        for name, w, ggml_type in read_gguf_tensors(reader, config):
            writer.write(output_name(name), w.to(dtype).contiguous())
            types[ggml_type] += 1
            del w  # not held while the next tensor is dequantized
    try:
        text = dumps(config, what="config.json", indent=2, sort_keys=True)
    except NonFiniteJSON as exc:  # a float of the GGUF's metadata (rms eps, rope base...)
        raise ModelLoadError(f"{gguf_path}: its metadata gives {exc.value} for {exc.where}, "
                             "which is not a value; the file is damaged") from None
    (out_dir / "config.json").write_text(text)
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if config.get(k) is not None}
    (out_dir / "generation_config.json").write_text(
        dumps(gen, what="generation_config.json", indent=2))
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
    keyed by the file's sha256, so a GGUF can be a source like any checkpoint directory. The
    build goes to ``.KEY.build-<owner>-<random>`` (see :mod:`quantbench.tempfiles`): a killed
    import leaves no entry, and the next import of the file removes what it left."""
    from quantbench import tempfiles
    from quantbench.diskspace import reported
    from quantbench.faults import failpoint
    from quantbench.formats.manifest import sha256_file
    from quantbench.models.cache import cache_root

    gguf_path = Path(gguf_path)
    target = cache_root() / "gguf" / sha256_file(gguf_path)[:24]
    if (target / "config.json").is_file():
        return target
    prefix = f".{target.name}.build-"
    needed = lambda: _fp16_bytes(gguf_path)  # noqa: E731  (read only when the disk filled)
    hint = "free some space or set QUANTBENCH_CACHE to a disk with room for the FP16 import"
    with reported(target.parent, needed, hint):
        target.parent.mkdir(parents=True, exist_ok=True)
        tempfiles.sweep(target.parent, prefix)
        tmp = tempfiles.make_dir(target.parent, prefix)
    try:
        with reported(target.parent, needed, hint):
            out = tmp / "model"
            info = convert_gguf_to_hf(gguf_path, out)
            failpoint("import-gguf")
            log.info("imported %s (%s) as an FP16 checkpoint", gguf_path.name, info["gguf_types"])
            if not target.exists():
                out.rename(target)
    finally:
        tempfiles.remove(tmp)
    return target


def _fp16_bytes(gguf_path: Path) -> int | None:
    """Bytes of the FP16 import of a GGUF (two per weight), for the message of an import that
    filled the disk (so the file was read once already); None when it cannot be read."""
    import gguf

    try:
        return 2 * sum(int(t.n_elements) for t in gguf.GGUFReader(str(gguf_path)).tensors)
    except Exception:  # noqa: BLE001 - any unreadable file: the import reports it properly
        return None
