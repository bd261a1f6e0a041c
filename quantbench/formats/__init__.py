"""Checkpoint formats, each a registered writer + reader (importing registers them)."""
from quantbench.formats import awq, bitsandbytes, compressed_tensors, dense, gguf, gptq  # noqa: F401
