"""GGUF key/values and the few helpers every ``formats/gguf_*`` module shares: the :class:`KV`
record, the HF → GGUF architecture name, reading a JSON side file. A leaf below
:mod:`quantbench.formats.gguf_meta` (metadata), :mod:`quantbench.formats.gguf_vocab` and
:mod:`quantbench.formats.gguf_special` (tokenizer keys), which all import it.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quantbench.errors import ConfigError
from quantbench.formats.gguf_key import KV  # (its home is a leaf: see gguf_key.py)
from quantbench.models.arch import ARCHITECTURES

ARCHS = {t: spec.gguf_arch for spec in ARCHITECTURES for t in spec.model_types}  # HF → GGUF arch


def kv_dict(kvs: Sequence[KV]) -> dict[str, Any]:
    """``{key: value}``; a later entry for the same key replaces an earlier one (as in gguf-py)."""
    return {kv.key: kv.value for kv in kvs}


def gguf_arch(config: dict) -> str:
    """The GGUF architecture name of an HF config; ConfigError for the unsupported ones."""
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise ConfigError(f"GGUF export does not support model_type {model_type!r}; "
                          f"supported: {', '.join(ARCHS)}")
    return ARCHS[model_type]


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
