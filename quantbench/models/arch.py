"""Per-architecture knowledge, declared as data: the registry of families (``ARCHITECTURES``)
and the lookup by ``model_type``. The vocabulary (``ArchSpec``, ``Sublayer``, ``Fused``) and the
llama layout live in ``models/archspec.py``; each further family is one file of
``models/families/``.
"""
from __future__ import annotations

from quantbench.errors import ModelLoadError
from quantbench.models.archspec import (  # noqa: F401  (re-exported: the names callers use)
    DERIVED_BUFFERS,
    LLAMA_BIASES,
    LLAMA_HYPERPARAMETERS,
    LLAMA_LINEARS,
    LLAMA_SHAPES,
    LLAMA_SUBLAYERS,
    ArchSpec,
    Fused,
    Sublayer,
    config_value,
)


def _llama_gguf_config(meta, kwargs: dict) -> None:
    """llama arch GGUF → LlamaConfig entries the common keys do not give."""
    kwargs.update(head_dim=meta.head_dim, attention_bias="blk.0.attn_q.bias" in meta.names,
                  mlp_bias="blk.0.ffn_up.bias" in meta.names)


LLAMA = ArchSpec(family="llama", model_types=("llama", "mistral"), gguf_qk_permute=True,
                 gguf_config=_llama_gguf_config)
QWEN2 = ArchSpec(family="qwen2", model_types=("qwen2",), gguf_arch="qwen2",
                 biases=((None, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),),
                 hf_classes=("Qwen2Config", "Qwen2ForCausalLM"))


def _families() -> tuple[ArchSpec, ...]:
    from quantbench.models.families import FAMILIES  # each family one file (imports ArchSpec)

    return FAMILIES


ARCHITECTURES: tuple[ArchSpec, ...] = (LLAMA, QWEN2, *_families())


def supported_model_types() -> list[str]:
    return sorted(t for spec in ARCHITECTURES for t in spec.model_types)


def arch_for(model_type: str | None) -> ArchSpec:
    from quantbench.models.families import UNSUPPORTED

    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    if model_type in UNSUPPORTED:
        raise ModelLoadError(f"model_type {model_type!r}: {UNSUPPORTED[model_type]}")
    raise ModelLoadError(
        f"unsupported architecture {model_type!r}; quantbench supports "
        f"{', '.join(supported_model_types())}"
    )
