"""Mixture-of-experts families: Mixtral (``model_type`` mixtral, llama.cpp arch ``llama`` with
``expert_count``) and Qwen3-MoE (``qwen3_moe``, llama.cpp arch ``qwen3moe``).

A llama (Qwen3: with q/k norms) attention and, in place of the MLP, a router ``mlp.gate [E, H]``
(softmax in float32, top-k, Mixtral always renormalising the k weights, Qwen3-MoE when
``norm_topk_prob``) over ``E`` SwiGLU experts. The model holds the experts as
``mlp.experts.<e>.{gate,up,down}_proj`` linears (``models/experts.py``); checkpoints store them
so (Qwen3-MoE before transformers 5), as Mixtral's ``block_sparse_moe.experts.<e>.w1/w3/w2``
(renamed on load, and written back under those names: what transformers 5's conversion,
vLLM and GPTQModel read for Mixtral), or fused 3-D (transformers 5: read as per-expert views).
Only the expert linears and attention are quantized; the router stays in the checkpoint's dtype.
"""
from __future__ import annotations

from dataclasses import replace

from quantbench.models.archspec import (LLAMA, LLAMA_HYPERPARAMETERS, LLAMA_SHAPES, Experts,
                                        Sublayer)
from quantbench.models.families.qwen3 import QWEN3

ATTENTION = LLAMA.linears[:4]
ATTENTION_GROUPS = LLAMA.sequential_groups[:2]
ATTENTION_FOLDING = LLAMA.scale_folding[:2]
NO_MLP = tuple((m, d) for m, d in LLAMA_SHAPES if not m.startswith("mlp."))
MOE_SUBLAYERS = (LLAMA.sublayers[0],
                 Sublayer("post_attention_layernorm", "mlp", (), None))
MOE_HYPERPARAMETERS = LLAMA_HYPERPARAMETERS + (("num_experts_per_tok", "count"),)

# tensor or module names (a module path ends where a tensor name goes on: ``(?=\.|$)``)
_LAYER = r"^(model\.layers\.\d+)\.block_sparse_moe\."
_END = r"(?=\.|$)"
MIXTRAL_RENAMES = ((_LAYER + r"gate" + _END, r"\1.mlp.gate"),
                   (_LAYER + r"experts\.(\d+)\.w1" + _END, r"\1.mlp.experts.\2.gate_proj"),
                   (_LAYER + r"experts\.(\d+)\.w3" + _END, r"\1.mlp.experts.\2.up_proj"),
                   (_LAYER + r"experts\.(\d+)\.w2" + _END, r"\1.mlp.experts.\2.down_proj"))
_MODULE = r"^(model\.layers\.\d+)\.mlp\."
MIXTRAL_OUTPUT_NAMES = (
    (_MODULE + r"gate" + _END, r"\1.block_sparse_moe.gate"),
    (_MODULE + r"experts\.(\d+)\.gate_proj" + _END, r"\1.block_sparse_moe.experts.\2.w1"),
    (_MODULE + r"experts\.(\d+)\.up_proj" + _END, r"\1.block_sparse_moe.experts.\2.w3"),
    (_MODULE + r"experts\.(\d+)\.down_proj" + _END, r"\1.block_sparse_moe.experts.\2.w2"))

def _mixtral_gguf_config(meta, kwargs: dict) -> None:
    """llama arch GGUF with experts → MixtralConfig entries: ``head_dim`` only where it is not
    hidden / heads (MixtralConfig has no bias flags)."""
    if meta.head_dim != kwargs["hidden_size"] // kwargs["num_attention_heads"]:
        kwargs["head_dim"] = meta.head_dim


MIXTRAL = replace(
    LLAMA, family="mixtral", model_types=("mixtral",),
    linears=ATTENTION, sequential_groups=ATTENTION_GROUPS, scale_folding=ATTENTION_FOLDING,
    sublayers=MOE_SUBLAYERS, shapes=NO_MLP, biases=(), hyperparameters=MOE_HYPERPARAMETERS,
    hf_classes=("MixtralConfig", "MixtralForCausalLM"),
    experts=Experts(count_keys=("num_local_experts",), size_key="intermediate_size"),
    checkpoint_renames=MIXTRAL_RENAMES, output_renames=MIXTRAL_OUTPUT_NAMES,
    gguf_config=_mixtral_gguf_config,
    gguf_names=tuple((h, g) for h, g in LLAMA.gguf_names if not h.startswith("mlp.")),
)

QWEN3_MOE = replace(
    QWEN3, family="qwen3_moe", model_types=("qwen3_moe",), gguf_arch="qwen3moe",
    linears=ATTENTION, sequential_groups=ATTENTION_GROUPS, scale_folding=ATTENTION_FOLDING,
    sublayers=MOE_SUBLAYERS,
    shapes=tuple((m, d) for m, d in QWEN3.shapes if not m.startswith("mlp.")),
    hyperparameters=MOE_HYPERPARAMETERS + (("norm_topk_prob", "flag"),),
    hf_classes=("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    experts=Experts(count_keys=("num_experts", "num_local_experts"), size_key="moe_intermediate_size",
                    normalize_key="norm_topk_prob"),
    gguf_names=tuple((h, g) for h, g in QWEN3.gguf_names if not h.startswith("mlp.")),
)
