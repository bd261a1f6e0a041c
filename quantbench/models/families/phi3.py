"""Phi-3 (``model_type`` phi3: Phi-3/3.5-mini, Phi-4-mini; llama.cpp arch ``phi3``).

A llama block whose attention input projections are one linear, ``self_attn.qkv_proj`` (q, k, v
rows in that order), and whose MLP input projections are one, ``mlp.gate_up_proj`` (gate rows,
then up rows). Both are quantized as stored (transformers, vLLM and llama.cpp load them by
these names); the ``Fused`` declarations say where each logical part's rows are, so GPTQ reads
the value rows with their attention-weighted Hessians and AWQ folds v→o and up→down into those
rows only. llama.cpp's converter (``Phi3MiniModel``) keeps both fused (``attn_qkv``, and
``ffn_up`` holding gate and up: llama.cpp splits it in its SwiGLU), permutes nothing, and writes
its own hyperparameter block (``set_gguf_parameters`` does not call TextModel's): the order
below, with ``general.file_type`` before the sliding window. Partial rotary embeddings
(Phi-4-mini: ``partial_rotary_factor`` 0.75) are ``rope.dimension_count``; LongRoPE
(``long_factor``/``short_factor``, Phi-3-*-128k, Phi-3.5, Phi-4-mini) is written by the converter as
two F32 tensors made from the config, ``rope_factors_long/short.weight`` (written first), and
the key ``phi3.rope.scaling.attn_factor`` (before ``general.type``: it makes the tensors before
the metadata); import reads them back into ``rope_parameters``. llama.cpp picks the long
factors when its context (padded to a multiple of 256) exceeds
``original_max_position_embeddings``, transformers when the sequence does.
"""
from __future__ import annotations

import math

from quantbench.errors import ConfigError, ModelLoadError
from quantbench.models.archspec import LLAMA_HYPERPARAMETERS, ArchSpec, Fused, Sublayer

QKV = Fused("self_attn.qkv_proj", (("self_attn.q_proj", "num_attention_heads*head_dim"),
                                   ("self_attn.k_proj", "num_key_value_heads*head_dim"),
                                   ("self_attn.v_proj", "num_key_value_heads*head_dim")))
GATE_UP = Fused("mlp.gate_up_proj", (("mlp.gate_proj", "intermediate_size"),
                                     ("mlp.up_proj", "intermediate_size")))


def _rope(config: dict) -> dict:
    """``rope_parameters`` (transformers 5) or ``rope_scaling`` (4.x), with the top-level
    ``rope_theta`` / ``partial_rotary_factor`` older configs keep."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    for key in ("rope_theta", "partial_rotary_factor"):
        if key not in rope and config.get(key) is not None:
            rope[key] = config[key]
    return rope


LONGROPE = ("rope_factors_long.weight", "rope_factors_short.weight")  # GGUF names


def _longrope(config: dict) -> dict | None:
    """The LongRoPE ``rope_parameters`` of a config (None without scaling factors); refuses
    what llama.cpp's phi3 cannot run: another scaling type, factor lists that are missing or
    not half the rotary dimensions long."""
    rope = _rope(config)
    kind = rope.get("rope_type", rope.get("type"))
    if not rope.get("long_factor") and kind not in ("longrope", "su", "yarn"):
        return None
    if kind not in ("longrope", "su"):
        raise ConfigError(f"config.json rope_parameters: phi3 RoPE scaling {kind!r} has no "
                          "llama.cpp equivalent quantbench writes (LongRoPE does); export "
                          "another format")
    half = rope_dims(config) // 2
    for key in ("long_factor", "short_factor"):
        factors = rope.get(key)
        if not isinstance(factors, list) or len(factors) != half:
            raise ConfigError(f"config.json rope_parameters.{key} must list {half} factors "
                              "(half the rotary dimensions) for LongRoPE; fix the config")
    return rope


def _original_ctx(config: dict) -> int:
    return int(config.get("original_max_position_embeddings")
               or _rope(config)["original_max_position_embeddings"])


def attn_factor(config: dict, rope: dict) -> float:
    """The LongRoPE attention scale transformers applies (``attention_factor``, else from
    ``factor``, else from max / original positions: the converter's formula)."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    orig = _original_ctx(config)
    scale = rope.get("factor") or int(config["max_position_embeddings"]) / orig
    return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0


def rope_dims(config: dict) -> int:
    """``rope.dimension_count`` as the converter computes it: the rotary share of
    hidden / heads."""
    factor = float(_rope(config).get("partial_rotary_factor", 1.0))
    return int(factor * int(config["hidden_size"])) // int(config["num_attention_heads"])


def gguf_params(config: dict) -> list:
    """The ``phi3.*`` keys of ``Phi3MiniModel.set_gguf_parameters``, in its order
    (``general.file_type`` goes before ``phi3.attention.sliding_window``)."""
    from gguf import GGUFValueType as VT

    from quantbench.formats.gguf_key import KV

    _longrope(config)  # refusals
    rope = _rope(config)
    heads = int(config["num_attention_heads"])
    orig = config.get("original_max_position_embeddings",
                      rope.get("original_max_position_embeddings"))
    u32 = lambda key, value: KV(f"phi3.{key}", int(value), VT.UINT32)  # noqa: E731
    return [u32("context_length", config["max_position_embeddings"]),
            u32("rope.scaling.original_context_length", orig),
            u32("embedding_length", config["hidden_size"]),
            u32("feed_forward_length", config["intermediate_size"]),
            u32("block_count", config["num_hidden_layers"]),
            u32("attention.head_count", heads),
            u32("attention.head_count_kv", config.get("num_key_value_heads") or heads),
            KV("phi3.attention.layer_norm_rms_epsilon", float(config["rms_norm_eps"]),
               VT.FLOAT32),
            u32("rope.dimension_count", rope_dims(config)),
            KV("phi3.rope.freq_base", float(rope.get("rope_theta", 10000.0)), VT.FLOAT32),
            u32("attention.sliding_window", config.get("sliding_window") or 0)]


def gguf_generate(config: dict) -> tuple[list, dict]:
    """``Phi3MiniModel.generate_extra_tensors``: for LongRoPE, the key
    ``phi3.rope.scaling.attn_factor`` and the long, then short, factors as F32 tensors."""
    from gguf import GGUFValueType as VT

    from quantbench.formats.gguf_key import KV
    from quantbench.lazy import torch

    rope = _longrope(config)
    if rope is None:
        return [], {}
    kv = KV("phi3.rope.scaling.attn_factor", attn_factor(config, rope), VT.FLOAT32)
    return [kv], {name: torch.tensor([float(f) for f in rope[key]], dtype=torch.float32)
                  for name, key in zip(LONGROPE, ("long_factor", "short_factor"))}


def _longrope_back(meta, config: dict) -> dict | None:
    """LongRoPE ``rope_parameters`` entries from the file's factor tensors (each float32 as
    its shortest decimal: the config's own numbers), with ``attention_factor`` only where
    the file's ``attn_factor`` is not the one the positions imply; None without them."""
    import numpy as np

    long, short = (meta.floats(name) for name in LONGROPE)
    if long is None and short is None:
        return None
    half = meta.count("rope.dimension_count", meta.head_dim) // 2
    if long is None or short is None or len(long) != half or len(short) != half:
        raise ModelLoadError(f"the GGUF's LongRoPE tensors {', '.join(LONGROPE)} must both hold "
                             f"{half} values (half the rotary dimensions): the file is "
                             "corrupted")
    out = {"rope_type": "longrope", **{key: [float(str(np.float32(v))) for v in values]
                                       for key, values in (("long_factor", long),
                                                           ("short_factor", short))}}
    if meta.field("phi3.rope.scaling.attn_factor") is not None:
        stored = meta.real("rope.scaling.attn_factor")
        if np.float32(stored) != np.float32(attn_factor(config, out)):
            out["attention_factor"] = stored
    return out


def gguf_config(meta, kwargs: dict) -> None:
    """phi3 GGUF → Phi3Config entries: the original context, the sliding window (0: none, as
    the converter writes for Phi-4) and the rotary share (``rope.dimension_count`` over
    hidden / heads)."""
    head_dim = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    # checked against hidden / heads here: without key_length the common import took its head
    # size from rope.dimension_count itself, so it cannot see a count past the head
    rotary = meta.rotary_dims(head_dim)
    rope = dict(kwargs.pop("rope_parameters", None) or {"rope_type": "default"})
    rope.setdefault("rope_theta", kwargs.pop("rope_theta", 10000.0))
    kwargs.pop("rope_theta", None)
    rope["partial_rotary_factor"] = rotary / head_dim
    window = meta.field("phi3.attention.sliding_window") or None
    kwargs.update(rope_parameters=rope, sliding_window=window,
                  original_max_position_embeddings=meta.count(
                      "rope.scaling.original_context_length",
                      kwargs["max_position_embeddings"]))
    rope.update(_longrope_back(meta, kwargs) or {})


PHI3 = ArchSpec(
    family="phi3", model_types=("phi3",), gguf_arch="phi3",
    linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    sequential_groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",),
                       ("mlp.down_proj",)),
    # a part name as ``prev``: the scales divide only those rows of its fused linear
    scale_folding=(("input_layernorm", ("self_attn.qkv_proj",)),
                   ("self_attn.v_proj", ("self_attn.o_proj",)),
                   ("post_attention_layernorm", ("mlp.gate_up_proj",)),
                   ("mlp.up_proj", ("mlp.down_proj",))),
    sublayers=(Sublayer("input_layernorm", "self_attn", ("self_attn.qkv_proj",),
                        "self_attn.o_proj", takes_layer_kwargs=True, values="self_attn.v_proj"),
               Sublayer("post_attention_layernorm", "mlp", ("mlp.gate_up_proj",),
                        "mlp.down_proj")),
    fused=(QKV, GATE_UP),
    shapes=(("self_attn.o_proj", ("hidden_size", "num_attention_heads*head_dim")),
            ("mlp.down_proj", ("hidden_size", "intermediate_size")),
            ("input_layernorm", ("hidden_size",)),
            ("post_attention_layernorm", ("hidden_size",)),
            ("model.embed_tokens", ("vocab_size", "hidden_size")),
            ("model.norm", ("hidden_size",)),
            ("lm_head", ("vocab_size", "hidden_size"))),
    biases=(),
    hyperparameters=LLAMA_HYPERPARAMETERS + (
        ("rope_parameters.partial_rotary_factor", "positive"),
        ("original_max_position_embeddings", "count")),
    hf_classes=("Phi3Config", "Phi3ForCausalLM"),
    gguf_params=gguf_params, gguf_file_type_before="phi3.attention.sliding_window",
    gguf_config=gguf_config, gguf_generated=LONGROPE, gguf_generate=gguf_generate,
    gguf_names=(("self_attn.qkv_proj", "attn_qkv"), ("self_attn.o_proj", "attn_output"),
                ("mlp.gate_up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
                ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")),
)
