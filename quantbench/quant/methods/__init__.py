"""Quantization methods, each registered by name (importing this package registers them)."""
from quantbench.quant.methods import awq, bnb, exl2, gguf, gptq, rtn  # noqa: F401
