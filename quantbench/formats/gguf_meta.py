"""HF → GGUF, the data-level parts: metadata, tokenizer, tensor names and Q/K permutation.

What llama.cpp's own ``convert_hf_to_gguf.py`` (llama-cpp-python 0.3.36's vendored copy) writes
for the llama family (HF ``model_type`` llama, mistral, mixtral → GGUF ``llama``; qwen2 →
``qwen2``; the other families of ``models/families/``, Qwen3-MoE → ``qwen3moe``),
computed from ``config.json``, ``generation_config.json`` and the tokenizer files alone: no
weights are read, no remote code runs, nothing is unpickled. The per-tensor types of the
``llama-quantize`` mixtures live in :mod:`quantbench.quant.gguf.mixtures`; the ``tokenizer.*``
keys in :mod:`quantbench.formats.gguf_vocab` (vocabularies) and
:mod:`quantbench.formats.gguf_special` (special tokens, chat template).
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gguf import GGUFValueType as VT

from quantbench.errors import ConfigError, ModelLoadError
from quantbench.formats.gguf_kv import (ARCHS, KV, expert_count_kvs,  # noqa: F401
                                        expert_part, expert_size_kvs, gguf_arch,
                                        gguf_tensor_name, hf_tensor_names, kv_dict,
                                        parameter_counts, read_json)  # (some re-exported)
from quantbench.lazy import torch
from quantbench.quant.gguf.mixtures import file_type
from quantbench.models.arch import arch_of

log = logging.getLogger(__name__)

QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
DEFAULT_ALIGNMENT = 32
_SAMPLING = (("sequence", "sequence", VT.STRING), ("top_k", "top_k", VT.INT32),
             ("top_p", "top_p", VT.FLOAT32), ("min_p", "min_p", VT.FLOAT32),
             ("xtc_probability", "xtc_probability", VT.FLOAT32),
             ("xtc_threshold", "xtc_threshold", VT.FLOAT32), ("temperature", "temp", VT.FLOAT32),
             ("penalty_last_n", "penalty_last_n", VT.INT32),
             ("repetition_penalty", "penalty_repeat", VT.FLOAT32),
             ("mirostat", "mirostat", VT.INT32), ("mirostat_tau", "mirostat_tau", VT.FLOAT32),
             ("mirostat_eta", "mirostat_eta", VT.FLOAT32))


# ---------------------------------------------------------------------------------- metadata

def gguf_metadata(config: dict, model_dir: Path, *, ftype: str = "F16", name: str | None = None,
                  n_params: int | Sequence[int] | None = None, alignment: int = DEFAULT_ALIGNMENT,
                  tokenizer: bool = True, unknown_pre: str | None = "default") -> list[KV]:
    """Every ``general.*``, ``<arch>.*`` (and, with ``tokenizer``, ``tokenizer.*``) key that
    llama.cpp's converter writes for this model, in its order, with ``general.file_type`` of the
    mixture ``ftype``. ``n_params`` (for ``general.size_label``: a count, or gguf-py's
    :func:`parameter_counts` of a mixture-of-experts model) defaults to the counts of the
    tensors the GGUF will hold, from the safetensors headers in ``model_dir``."""
    from quantbench.formats.gguf_vocab import tokenizer_metadata

    model_dir = Path(model_dir)
    arch = gguf_arch(config)
    if n_params is None:
        n_params = count_params(checkpoint_shapes(model_dir), config)
    counts = (n_params, n_params, 0, 0) if isinstance(n_params, int) else tuple(n_params)
    kvs = [KV("general.architecture", arch, VT.STRING), *generated(config)[0],
           KV("general.type", "model", VT.STRING)]
    kvs += _sampling_kvs(model_dir)
    kvs.append(KV("general.name", name or default_name(config, model_dir), VT.STRING))
    if counts[0] > 0:
        kvs.append(KV("general.size_label", size_label(*counts), VT.STRING))
    arch_kvs = _with_file_type(arch_metadata(config), KV("general.file_type", file_type(ftype),
                                                        VT.UINT32), config)
    arch_kvs += expert_size_kvs(config)
    spec = arch_of(config)
    kvs += spec.gguf_arrange(config, arch_kvs) if spec.gguf_arrange is not None else arch_kvs
    if arch == "llama":
        kvs.append(KV("llama.vocab_size", int(config["vocab_size"]), VT.UINT32))
        kvs.append(KV("llama.rope.dimension_count", head_dim(config), VT.UINT32))
    kvs.append(KV("general.quantization_version", QUANTIZATION_VERSION, VT.UINT32))
    if alignment != DEFAULT_ALIGNMENT:
        if alignment <= 0 or alignment & (alignment - 1):
            raise ConfigError(f"GGUF alignment {alignment} is not a power of two")
        kvs.append(KV("general.alignment", alignment, VT.UINT32))
    if tokenizer:
        kvs += tokenizer_metadata(model_dir, config, unknown_pre=unknown_pre)
    return kvs


def _with_file_type(kvs: list[KV], ftype: KV, config: dict) -> list[KV]:
    """``general.file_type`` where the converter writes it: after the ``<arch>.*`` block, or
    before the family's ``ArchSpec.gguf_file_type_before`` key."""
    before = arch_of(config).gguf_file_type_before
    at = next((i for i, kv in enumerate(kvs) if kv.key == before), len(kvs))
    return kvs[:at] + [ftype] + kvs[at:]


def head_dim(config: dict) -> int:
    """``rope.dimension_count``: ``head_dim`` or hidden / heads."""
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def rope_parameters(config: dict) -> dict[str, Any]:
    """The converter's view of the RoPE config: ``rope_parameters`` (transformers 5) or
    ``rope_scaling`` (4.x), with ``rope_theta``/``type`` mirrored in; the full-attention part."""
    params = dict(config.get("rope_parameters", config.get("rope_scaling")) or {})
    if "full_attention" not in params and "sliding_attention" not in params:
        theta = next((config[k] for k in ("global_rope_theta", "rope_global_theta",
                      "rope_theta_global", "rope_theta", "rotary_emb_base")
                      if config.get(k) is not None), None)
        if "rope_theta" not in params and theta is not None:
            params["rope_theta"] = theta
        if "rope_type" not in params and params.get("type") is not None:
            params["rope_type"] = params["type"]
        if "original_max_position_embeddings" not in params and \
                config.get("original_max_position_embeddings") is not None:
            params["original_max_position_embeddings"] = config["original_max_position_embeddings"]
    return params.get("full_attention", params)


def arch_metadata(config: dict) -> list[KV]:
    """The ``<arch>.*`` hyperparameters (TextModel.set_gguf_parameters), in the converter's
    order; ``vocab_size``/``rope.dimension_count`` (llama only) are added by gguf_metadata.
    A family whose converter writes its own block (``ArchSpec.gguf_params``) gives it whole."""
    a = gguf_arch(config)
    spec = arch_of(config)
    if spec.gguf_params is not None:
        return spec.gguf_params(config)
    kvs = [KV(f"{a}.block_count", int(config["num_hidden_layers"]), VT.UINT32)]
    for key, hf in (("context_length", "max_position_embeddings"),
                    ("embedding_length", "hidden_size"),
                    ("feed_forward_length", "intermediate_size"),
                    ("attention.head_count", "num_attention_heads"),
                    ("attention.head_count_kv", "num_key_value_heads")):
        if config.get(hf) is not None:
            kvs.append(KV(f"{a}.{key}", int(config[hf]), VT.UINT32))
    if config.get("is_causal") is False:
        kvs.append(KV(f"{a}.attention.causal", False, VT.BOOL))
    rope = rope_parameters(config)
    kvs += _rope_scaling_kvs(a, rope)
    if rope.get("rope_theta") is not None:
        kvs.append(KV(f"{a}.rope.freq_base", float(rope["rope_theta"]), VT.FLOAT32))
    local = ((config.get("rope_parameters") or {}).get("sliding_attention") or {}).get(
        "rope_theta")  # per-layer-kind RoPE (Gemma 3): the sliding layers' base
    if local is not None:
        kvs.append(KV(f"{a}.rope.freq_base_swa", float(local), VT.FLOAT32))
    eps = config.get("rms_norm_eps", config.get("norm_eps"))
    if eps is not None:
        kvs.append(KV(f"{a}.attention.layer_norm_rms_epsilon", float(eps), VT.FLOAT32))
    kvs += expert_count_kvs(config)
    if config.get("head_dim") is not None:
        kvs.append(KV(f"{a}.attention.key_length", int(config["head_dim"]), VT.UINT32))
        kvs.append(KV(f"{a}.attention.value_length", int(config["head_dim"]), VT.UINT32))
    if spec.gguf_kvs is not None:  # the family's own keys (models/families/<family>.py)
        kvs += spec.gguf_kvs(config)
    return kvs


def _rope_scaling_kvs(a: str, rope: dict) -> list[KV]:
    kind, factor = rope.get("rope_type"), rope.get("factor")
    if kind == "linear" and factor is not None:
        return [KV(f"{a}.rope.scaling.type", "linear", VT.STRING),
                KV(f"{a}.rope.scaling.factor", float(factor), VT.FLOAT32)]
    if kind in ("su", "longrope"):
        return [KV(f"{a}.rope.scaling.type", "longrope", VT.STRING)]
    if kind != "yarn" or factor is None:
        if kind not in (None, "dynamic") and str(kind).lower() != "llama3":
            log.debug("rope type %r writes no scaling keys (as in llama.cpp)", kind)
        return []  # llama3 scaling goes into the rope_freqs.weight tensor instead
    kvs = [KV(f"{a}.rope.scaling.type", "yarn", VT.STRING),
           KV(f"{a}.rope.scaling.factor", float(factor), VT.FLOAT32),
           KV(f"{a}.rope.scaling.original_context_length",
              int(rope["original_max_position_embeddings"]), VT.UINT32)]
    yarn = {"yarn_ext_factor": rope.get("extrapolation_factor"),
            "yarn_attn_factor": rope.get("attention_factor", rope.get("attn_factor")),
            "yarn_beta_fast": rope.get("beta_fast"), "yarn_beta_slow": rope.get("beta_slow")}
    return kvs + [KV(f"{a}.rope.scaling.{key}", float(v), VT.FLOAT32)
                  for key, v in yarn.items() if v is not None]


def _sampling_kvs(model_dir: Path) -> list[KV]:
    """``general.sampling.*`` from generation_config.json (gguf-py Metadata)."""
    gen = read_json(model_dir / "generation_config.json") or {}
    return [KV(f"general.sampling.{key}", gen[hf], vt) for hf, key, vt in _SAMPLING
            if gen.get(hf) is not None]


def default_name(config: dict, model_dir: Path) -> str:
    """``general.name``: the model part of ``_name_or_path`` when it is a hub id, else the folder
    name, title-cased as gguf-py does ("smollm2-fp16" → "Smollm2 Fp16")."""
    ident = config.get("_name_or_path") or ""
    ident = ident.split("/", 1)[-1] if ident and ident.count("/") <= 1 else Path(model_dir).name
    words = ident.strip().replace("-", " ").split()
    return " ".join(w.title() if w.islower() and not re.match(r"^(v\d+(?:\.\d+)*|\d.*)$", w)
                    else w for w in words)


def size_label(n_params: int, shared: int = 0, expert: int = 0, experts: int = 0) -> str:
    """gguf-py's rounded parameter count: 134515008 → "135M", 115008 → "115K"; with
    ``experts`` (a mixture-of-experts model: :func:`parameter_counts`), the count of the
    ``shared`` parameters and one expert's, after the expert count: "8x7.2B"."""
    if experts > 0:
        return f"{experts}x{size_label(shared + expert)}"
    for limit, scale, suffix in ((1e12, 1e-12, "T"), (1e9, 1e-9, "B"), (1e6, 1e-6, "M")):
        if n_params > limit:
            break
    else:
        scale, suffix = 1e-3, "K"
    scaled = n_params * scale
    digits = max(2 - len(str(round(scaled)).lstrip("0")), 0)
    return f"{scaled:.{digits}f}{suffix}"


# ------------------------------------------------------------------- tensor names and shapes

def checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """``{hf_name: torch shape}`` from the safetensors headers in ``model_dir`` (no data read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def tied_embeddings(config: dict) -> bool:
    """Whether ``lm_head`` shares ``embed_tokens`` (transformers' default is tied)."""
    return bool(config.get("tie_word_embeddings", True))


def gguf_name(hf_name: str, config: dict) -> str | None:
    """The GGUF tensor name of an HF llama-family tensor (``model.layers.3.self_attn.q_proj.weight``
    → ``blk.3.attn_q.weight``); None for tensors the GGUF leaves out (a tied ``lm_head``, rotary
    ``inv_freq`` buffers); ConfigError for a tensor llama.cpp has no name for."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    if hf_name == "lm_head.weight" and tied_embeddings(config):
        return None
    if not hf_name.endswith((".weight", ".bias")):
        raise ConfigError(f"no GGUF name for tensor {hf_name!r} of a "
                          f"{config.get('model_type')} model")
    spec = arch_of(config)
    try:
        return gguf_tensor_name(spec, spec.module_name(hf_name))
    except ModelLoadError as exc:
        raise ConfigError(f"no GGUF name for tensor {hf_name!r} of a "
                          f"{config.get('model_type')} model") from exc


def gguf_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """GGUF ``ne`` of a torch shape: reversed, so ``ne[0]`` is the row length."""
    return tuple(int(d) for d in reversed(tuple(shape)))


def tensor_plan(shapes: dict[str, Sequence[int]], config: dict) -> list[tuple[str, str, tuple]]:
    """``(hf_name, gguf_name, ne)`` for every tensor the GGUF holds: the generated ones first
    (hf_name "": :func:`generated_tensors`), as the converter writes them, then the
    checkpoint's in its order; a block's experts as one stacked tensor each (``ne`` with the
    expert count last, hf_name expert 0's; a fused 3-D checkpoint read per expert)."""
    from quantbench.models.experts import fused_views

    spec = arch_of(config)
    for fused, pieces in fused_views(spec, dict(shapes)).items():
        shapes = {**{k: v for k, v in shapes.items() if k != fused},
                  **{name: shape for name, _, shape in pieces}}
    plan = [("", name, gguf_shape(t.shape)) for name, t in generated_tensors(config).items()]
    stacked: set[str] = set()
    for hf, shape in shapes.items():
        name = gguf_name(hf, config)
        if name is None or name in stacked:
            continue
        part = expert_part(spec, spec.module_name(hf))
        if part is not None:
            stacked.add(name)
        plan.append((hf, name, gguf_shape(shape) + ((spec.num_experts,) if part else ())))
    return plan


def generated(config: dict) -> tuple[list[KV], dict[str, torch.Tensor]]:
    """The keys and float32 tensors the family's converter class makes from the config
    (``ArchSpec.gguf_generate``: Phi-3's LongRoPE factors), none for the others."""
    hook = arch_of(config).gguf_generate
    return hook(config) if hook is not None else ([], {})


def generated_tensors(config: dict) -> dict[str, torch.Tensor]:
    """``{GGUF name: float32 tensor}`` of the tensors the converter makes from the config:
    the family's (:func:`generated`) and llama3 RoPE scaling's ``rope_freqs.weight``."""
    out = dict(generated(config)[1])
    freqs = rope_freqs(config)
    if freqs is not None:
        out["rope_freqs.weight"] = freqs
    return out


def count_params(shapes: dict[str, Sequence[int]], config: dict) -> tuple[int, int, int, int]:
    """:func:`parameter_counts` of the tensors the GGUF will hold (``general.size_label``)."""
    return parameter_counts((name, ne) for _, name, ne in tensor_plan(shapes, config))



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


def needs_qk_permute(config: dict) -> bool:
    """llama-arch GGUFs store Q/K rows in llama.cpp's interleaved RoPE order; qwen2 does not
    (the family's ``ArchSpec.gguf_qk_permute``)."""
    gguf_arch(config)  # refuses an unsupported model type
    return arch_of(config).gguf_qk_permute


def norm_offset(config: dict, hf_name: str) -> float:
    """What llama.cpp's converter adds to the norm weight ``hf_name`` (Gemma stores ``1 + w``:
    ``ArchSpec.gguf_norm_plus_offset``); 0.0 for every other tensor and family. The writer
    adds it, the readers subtract it."""
    spec = arch_of(config)
    if not spec.gguf_norm_plus_offset or not hf_name.endswith(".weight"):
        return 0.0
    module = hf_name[: -len(".weight")]
    index = spec.block_of(hf_name)
    if index is not None:
        module = module[len(f"{spec.block_prefix}.{index}."):]
        return spec.norm_offset if module in spec.norms else 0.0
    return spec.norm_offset if module == spec.final_norm else 0.0


def qk_permute_heads(config: dict, hf_name: str) -> int | None:
    """The heads whose rows llama.cpp's llama arch interleaves for RoPE in the tensor
    ``hf_name`` (Q: ``num_attention_heads``, K: ``num_key_value_heads``, weights and biases);
    None for every other tensor and for archs stored unpermuted (qwen2). The one place the
    writer, the converter check and the reader decide the Q/K permutation."""
    if not needs_qk_permute(config):
        return None
    module = hf_name.rpartition(".")[0]
    if module.endswith("self_attn.q_proj"):
        return int(config["num_attention_heads"])
    if module.endswith("self_attn.k_proj"):
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def plus_norm_offset(w: torch.Tensor, offset: float) -> torch.Tensor:
    """``w + offset`` as llama.cpp's converter computes it: in the tensor's own dtype for
    float16/float32, in float32 for the others (it widens bfloat16 first), so the bytes are
    the converter's."""
    return (w if w.dtype in (torch.float16, torch.float32) else w.float()) + offset


def to_gguf_tensor(hf_name: str, w: torch.Tensor, config: dict) -> torch.Tensor:
    """A tensor in GGUF form: rows in GGUF order (:func:`qk_permute_heads` decides the
    permutation), a norm weight with :func:`norm_offset` added."""
    offset = norm_offset(config, hf_name)
    if offset:
        w = plus_norm_offset(w, offset)
    heads = qk_permute_heads(config, hf_name)
    return permute_qk(w, heads) if heads else w


def rope_freqs(config: dict) -> torch.Tensor | None:
    """The float32 ``rope_freqs.weight`` llama.cpp's converter generates for llama3 RoPE
    scaling (Llama 3.1+), or None when the model has none."""
    rope = rope_parameters(config)
    if gguf_arch(config) != "llama" or str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base, dim = rope.get("rope_theta", 10000.0), head_dim(config)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)
