"""Architecture families beyond llama/qwen2, one file each (an ``ArchSpec`` and its hooks).

A new family: add ``<family>.py`` defining its spec(s), list them in ``FAMILIES`` here, and add
its tests (tiny random model from transformers' config class; GGUF against llama.cpp's
converter and runtime)."""
from __future__ import annotations

from quantbench.models.families import gemma
from quantbench.models.families.phi3 import PHI3
from quantbench.models.families.qwen3 import QWEN3

FAMILIES: tuple = (QWEN3, gemma.GEMMA2, gemma.GEMMA3, gemma.GEMMA3_MM, PHI3)
# model_type → what is missing and what to do (arch_for says it in one line)
_MOE = ("a mixture-of-experts model: quantbench does not route calibration through experts "
        "or write stacked expert tensors yet; quantize a dense model")
UNSUPPORTED: dict[str, str] = {"mixtral": _MOE, "qwen2_moe": _MOE, "qwen3_moe": _MOE,
                               "deepseek_v3": _MOE, "gpt_oss": _MOE}
