"""Qwen3 (HF ``model_type`` qwen3, llama.cpp GGUF arch ``qwen3``).

A llama-shaped block with two differences that matter here: an RMSNorm over each head of the
query and key projections (``self_attn.q_norm`` / ``self_attn.k_norm``, one ``head_dim``-long
weight shared by all heads, applied after the projection and before RoPE), and an explicit
``head_dim`` that need not be ``hidden_size / num_attention_heads`` (Qwen3-0.6B: 1024 wide,
16 heads of 128). Q/K biases only with ``attention_bias``; no Q/K row permutation in GGUF
(llama.cpp's converter handles Qwen3 as Qwen2, plus the two norms).

Nothing else changes for the methods: the q/k norms sit inside ``self_attn`` (the calibration
layer runs the attention module whole), they are not quantized (not ``linears``), and AWQ's
folding of ``input_layernorm`` into q/k/v stays exact, since scaling the projections' input
columns by ``s`` and the norm by ``1/s`` leaves the projections' outputs, hence what q/k_norm
see, unchanged.
"""
from __future__ import annotations

from quantbench.errors import ConfigError
from quantbench.models.archspec import (LLAMA, LLAMA_BIASES, LLAMA_HYPERPARAMETERS, LLAMA_SHAPES,
                                    ArchSpec)

QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")


def _gguf_kvs(config: dict) -> list:
    """llama.cpp's converter writes no ``qwen3.*`` key beyond the common ones (key/value
    length come from ``head_dim``). It has no sliding-window key for Qwen3 either, and
    llama.cpp runs every layer with full attention: a model that really uses its window would
    get other logits from llama.cpp than from transformers, so its GGUF is refused."""
    kinds = config.get("layer_types") or []
    if config.get("use_sliding_window") and "sliding_attention" in kinds:
        raise ConfigError("this Qwen3 config uses sliding-window attention "
                          "(use_sliding_window: true), which llama.cpp's qwen3 architecture "
                          "does not implement (it would attend to every token); write another "
                          "format, or set use_sliding_window to false if the model never "
                          "needs it")
    return []


def _gguf_config(meta, kwargs: dict) -> None:
    """qwen3 GGUF → Qwen3Config entries the common keys do not give: ``head_dim`` (its config
    default is 128, not hidden / heads) and whether Q/K/V carry biases."""
    kwargs.update(head_dim=meta.head_dim, attention_bias="blk.0.attn_q.bias" in meta.names)


QWEN3 = ArchSpec(
    family="qwen3", model_types=("qwen3",), gguf_arch="qwen3",
    norms=("input_layernorm", "post_attention_layernorm", *QK_NORMS),
    shapes=(*LLAMA_SHAPES, ("self_attn.q_norm", ("head_dim",)),
            ("self_attn.k_norm", ("head_dim",))),
    biases=LLAMA_BIASES[:1],  # attention_bias (q/k/v/o); Qwen3's MLP has none
    hyperparameters=(*LLAMA_HYPERPARAMETERS, ("use_sliding_window", "flag"),
                     ("sliding_window", "count")),
    hf_classes=("Qwen3Config", "Qwen3ForCausalLM"),
    gguf_kvs=_gguf_kvs, gguf_config=_gguf_config,
    gguf_names=(*LLAMA.gguf_names,
                ("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm")),
)
