"""quantbench: quantize language models, write the formats runtimes load, prove the quality."""
from __future__ import annotations

__version__ = "0.1.0"

import quantbench.builtins  # noqa: E402,F401  (registers the built-in methods, formats, codecs)
from quantbench.api import (compare, evaluate, inspect, load_model, quantize, save,  # noqa: E402
                            upload)
from quantbench.config import IntGridConfig, QuantizeConfig, TargetConfig  # noqa: E402
from quantbench.recipes import Recipe, run_recipe  # noqa: E402
from quantbench.tensor import QuantizedTensor  # noqa: E402

__all__ = [
    "__version__",
    "load_model",
    "quantize",
    "save",
    "evaluate",
    "compare",
    "inspect",
    "upload",
    "Recipe",
    "run_recipe",
    "IntGridConfig",
    "QuantizeConfig",
    "TargetConfig",
    "QuantizedTensor",
]
