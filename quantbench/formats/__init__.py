"""Checkpoint formats, each a registered writer + reader (importing registers them)."""
from quantbench.formats import (awq, bitsandbytes, compressed_tensors, dense, exl2,  # noqa: F401
                                gguf, gptq)
