"""Per-architecture knowledge, declared as data: the registry of families (``ARCHITECTURES``)
and the lookup by ``model_type``. The vocabulary (``ArchSpec``, ``Sublayer``, ``Fused``) and the
llama layout live in ``models/archspec.py``; each further family is one file of
``models/families/``.
"""
from __future__ import annotations

from quantbench.errors import ModelLoadError
from quantbench.models.archspec import (  # noqa: F401  (re-exported: the names callers use)
    DERIVED_BUFFERS,
    LLAMA,
    LLAMA_BIASES,
    LLAMA_HYPERPARAMETERS,
    LLAMA_LINEARS,
    LLAMA_SHAPES,
    LLAMA_SUBLAYERS,
    QWEN2,
    ArchSpec,
    Fused,
    Sublayer,
    config_value,
)
from quantbench.models.families import FAMILIES, UNSUPPORTED  # one file each (see archspec)

ARCHITECTURES: tuple[ArchSpec, ...] = (LLAMA, QWEN2, *FAMILIES)


def supported_model_types() -> list[str]:
    return sorted(t for spec in ARCHITECTURES for t in spec.model_types)


def arch_for(model_type: str | None) -> ArchSpec:
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    if model_type in UNSUPPORTED:
        raise ModelLoadError(f"model_type {model_type!r}: {UNSUPPORTED[model_type]}")
    raise ModelLoadError(
        f"unsupported architecture {model_type!r} (quantbench has no layout declared for it: "
        f"which linears a block holds, its norms, its GGUF names); it supports "
        f"{', '.join(supported_model_types())}"
    )


def arch_of(config: dict) -> ArchSpec:
    """The architecture of a model config, specialised to it (a mixture-of-experts family
    expanded to its expert count: ``ArchSpec.for_config``)."""
    return arch_for(config.get("model_type")).for_config(config)
