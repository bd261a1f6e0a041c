"""Architecture families beyond llama/qwen2, one file each (an ``ArchSpec`` and its hooks).

A new family: add ``<family>.py`` defining its spec(s), list them in ``FAMILIES`` here, and add
its tests (tiny random model from transformers' config class; GGUF against llama.cpp's
converter and runtime)."""
from __future__ import annotations

from quantbench.models.families import gemma
from quantbench.models.families.moe import MIXTRAL, QWEN3_MOE
from quantbench.models.families.phi3 import PHI3
from quantbench.models.families.qwen3 import QWEN3

FAMILIES: tuple = (QWEN3, gemma.GEMMA2, gemma.GEMMA3, gemma.GEMMA3_MM, PHI3, MIXTRAL, QWEN3_MOE)
# model_type → what is missing and what to do (arch_for says it in one line)
_MOE = ("a mixture-of-experts layout quantbench does not support (it supports mixtral and "
        "qwen3_moe: routed experts without shared experts)")
UNSUPPORTED: dict[str, str] = {"qwen2_moe": _MOE,
                               "deepseek_v3": _MOE, "gpt_oss": _MOE}
