"""Architecture families beyond llama/qwen2, one file each (an ``ArchSpec`` and its hooks).

A new family: add ``<family>.py`` defining its spec(s), list them in ``FAMILIES`` here, and add
its tests (tiny random model from transformers' config class; GGUF against llama.cpp's
converter and runtime)."""
from __future__ import annotations

from quantbench.models.families import gemma

FAMILIES: tuple = (gemma.GEMMA2, gemma.GEMMA3, gemma.GEMMA3_MM)
# model_type → why it is refused and what to use (arch_for says it in one line)
UNSUPPORTED: dict[str, str] = {**gemma.UNSUPPORTED}
