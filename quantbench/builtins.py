"""The one place the built-in methods, formats and GGUF block codecs are imported, so that they
register themselves in their tables (``registry``, ``quant/gguf/codec``).

Those tables are leaves: they never import their entries, so a lookup needs no deferred import
and the package's imports flow one way (``tests/test_imports.py``). ``quantbench/__init__.py``
imports this module, so importing any part of quantbench registers every built-in. A new method,
format or codec is one file plus one line here.
"""
from __future__ import annotations

# GGUF block codecs (ggml types): the K-quants (Q4_K..Q6_K, then Q2_K and Q3_K), the legacy types.
import quantbench.quant.gguf.kquants  # noqa: F401
import quantbench.quant.gguf.kquants_low  # noqa: F401
import quantbench.quant.gguf.legacy  # noqa: F401

# Checkpoint formats.
import quantbench.formats.awq  # noqa: F401
import quantbench.formats.bitsandbytes  # noqa: F401
import quantbench.formats.compressed_tensors  # noqa: F401
import quantbench.formats.dense  # noqa: F401
import quantbench.formats.exl2  # noqa: F401
import quantbench.formats.gguf  # noqa: F401
import quantbench.formats.gptq  # noqa: F401

# Quantization methods.
import quantbench.quant.methods.awq  # noqa: F401
import quantbench.quant.methods.bnb  # noqa: F401
import quantbench.quant.methods.exl2  # noqa: F401
import quantbench.quant.methods.gguf  # noqa: F401
import quantbench.quant.methods.gptq  # noqa: F401
import quantbench.quant.methods.rtn  # noqa: F401
