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
two extra tensors, which quantbench's GGUF writer refuses for now.
"""
from __future__ import annotations

from quantbench.errors import ConfigError
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


def _longrope(config: dict) -> bool:
    rope = _rope(config)
    return bool(rope.get("long_factor")) or rope.get("rope_type", rope.get("type")) in (
        "longrope", "su", "yarn")


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

    if _longrope(config):
        raise ConfigError("this phi3 model uses LongRoPE scaling (rope_parameters long_factor/"
                          "short_factor), which quantbench's GGUF writer does not write yet; "
                          "use llama.cpp's convert_hf_to_gguf.py for its GGUF")
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


def gguf_config(meta, kwargs: dict) -> None:
    """phi3 GGUF → Phi3Config entries: the original context, the sliding window (0: none, as
    the converter writes for Phi-4) and the rotary share (``rope.dimension_count`` over
    hidden / heads)."""
    head_dim = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    rope = dict(kwargs.pop("rope_parameters", None) or {"rope_type": "default"})
    rope.setdefault("rope_theta", kwargs.pop("rope_theta", 10000.0))
    kwargs.pop("rope_theta", None)
    rope["partial_rotary_factor"] = meta.count("rope.dimension_count", head_dim) / head_dim
    window = meta.field("phi3.attention.sliding_window") or None
    kwargs.update(rope_parameters=rope, sliding_window=window,
                  original_max_position_embeddings=meta.count(
                      "rope.scaling.original_context_length",
                      kwargs["max_position_embeddings"]))


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
    gguf_config=gguf_config,
    gguf_names=(("self_attn.qkv_proj", "attn_qkv"), ("self_attn.o_proj", "attn_output"),
                ("mlp.gate_up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
                ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")),
)
