"""quantbench: quantize language models, write the formats runtimes load, prove the quality.

The public API (``quantbench.quantize``, ``load_model``, ``QuantizeConfig``, ...) is imported on
first use (PEP 562 ``__getattr__``), so ``import quantbench`` — and every command that computes
nothing, such as ``quantbench --help`` — stays cheap; ``quantbench/builtins.py`` declares the
built-in methods, formats and codecs to their registries without importing them.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import quantbench.builtins  # noqa: F401  (declares the built-in methods, formats, codecs)

__version__ = "0.1.0"

# public name → the module that defines it
_API = {
    "load_model": "quantbench.api",
    "quantize": "quantbench.api",
    "save": "quantbench.api",
    "evaluate": "quantbench.api",
    "plan_eval": "quantbench.api",
    "compare": "quantbench.api",
    "inspect": "quantbench.api",
    "upload": "quantbench.api",
    "Recipe": "quantbench.recipes",
    "run_recipe": "quantbench.recipes",
    "IntGridConfig": "quantbench.config",
    "QuantizeConfig": "quantbench.config",
    "TargetConfig": "quantbench.config",
    "QuantizedTensor": "quantbench.tensor",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'quantbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from quantbench.api import (compare, evaluate, inspect, load_model, plan_eval, quantize,
                                save, upload)
    from quantbench.config import IntGridConfig, QuantizeConfig, TargetConfig
    from quantbench.recipes import Recipe, run_recipe
    from quantbench.tensor import QuantizedTensor
