"""The built-in methods, formats and GGUF block codecs, as a catalogue: each name, the module
that registers it, and (methods, formats) the one-line description ``quantbench list`` shows.

``quantbench/__init__.py`` imports this module, which declares the catalogue to the registries
(``registry``, ``quant/gguf/codec``) without importing any entry: the names and descriptions are
known at once (``list``, did-you-mean), and a registry imports the modules of its kind the first
time a lookup needs a class (``registry.Table.fill``). Imports still flow one way: this module
and the entries import the registries, never the reverse (``tests/test_imports.py``). A new
method, format or codec is one file plus one line here; ``tests/test_builtins.py`` checks that
every line names what its module registers, with the same description.
"""
from __future__ import annotations

import importlib

from quantbench import registry
from quantbench.quant.gguf import codec

# Quantization methods: name → (module, description).
METHODS: dict[str, tuple[str, str]] = {
    "absmax": ("quantbench.quant.methods.rtn",
               "round-to-nearest, symmetric: scale = absmax / (2^(b-1) - 0.5)"),
    "awq": ("quantbench.quant.methods.awq",
            "AWQ: activation-aware scales folded into norms/linears + clipping, then RTN or "
            "GPTQ"),
    "exl2": ("quantbench.quant.methods.exl2",
             "EXL2: measured mix of 2-8 bit widths per layer for a bpw target (--bpw), GPTQ "
             "with act-order on exllamav2's grid"),
    "fp4": ("quantbench.quant.methods.bnb",
            "bitsandbytes FP4: blockwise absmax, 16 e2m1 floating-point levels"),
    "gptq": ("quantbench.quant.methods.gptq",
             "GPTQ: Hessian-weighted error feedback, act-order, on calibration data"),
    "imatrix": ("quantbench.quant.methods.gguf",
                "llama.cpp's importance-weighted scale/min search, importance (mean x² per "
                "input column) from the calibration layer or a llama.cpp imatrix file"),
    "llm_int8": ("quantbench.quant.methods.bnb",
                 "LLM.int8: per-row int8 weights; at run time activation outlier columns "
                 "(|x| >= threshold) in 16-bit"),
    "nf4": ("quantbench.quant.methods.bnb",
            "bitsandbytes NF4: blockwise absmax, 16 normal-quantile levels (QLoRA)"),
    "rtn": ("quantbench.quant.methods.gguf",
            "round-to-nearest with the grid's own fit: llama.cpp's reference quantizers on "
            "GGUF types, min/max scales on integer grids"),
    "zeropoint": ("quantbench.quant.methods.rtn",
                  "round-to-nearest with an integer zero-point over [min, max]"),
}

# Checkpoint formats: name → (module, description).
FORMATS: dict[str, tuple[str, str]] = {
    "awq": ("quantbench.formats.awq",
            "AWQ GEMM, 4-bit zero-point (transformers + gptqmodel, vLLM)"),
    "bitsandbytes": ("quantbench.formats.bitsandbytes",
                     "bitsandbytes NF4/FP4 (load_in_4bit) or LLM.int8 (load_in_8bit), as "
                     "transformers saves"),
    "compressed-tensors": ("quantbench.formats.compressed_tensors",
                           "compressed-tensors pack-quantized (vLLM, transformers + "
                           "compressed-tensors)"),
    "dense": ("quantbench.formats.dense",
              "dequantized weights in the original dtype; loads in plain transformers"),
    "exl2": ("quantbench.formats.exl2", "EXL2: mixed bit widths per layer and group (exllamav2)"),
    "gguf": ("quantbench.formats.gguf",
             "GGUF for llama.cpp: ggml block types and its named mixtures (Q4_K_M, ...)"),
    "gptq": ("quantbench.formats.gptq",
             "GPTQ qweight/qzeros/scales/g_idx (transformers+optimum, vLLM, exllamav2)"),
}

# GGUF block codecs (ggml types): name → module.
CODECS: dict[str, str] = {
    **dict.fromkeys(("Q4_K", "Q5_K", "Q6_K"), "quantbench.quant.gguf.kquants"),
    **dict.fromkeys(("Q2_K", "Q3_K"), "quantbench.quant.gguf.kquants_low"),
    **dict.fromkeys(("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"),
                    "quantbench.quant.gguf.legacy"),
}


def importer(modules: list[str]):
    """A loader that imports ``modules`` (each registers its entries)."""
    def load() -> None:
        for module in sorted(set(modules)):
            importlib.import_module(module)
    return load


registry.METHODS.declare({n: d for n, (_, d) in METHODS.items()},
                         importer([m for m, _ in METHODS.values()]))
registry.FORMATS.declare({n: d for n, (_, d) in FORMATS.items()},
                         importer([m for m, _ in FORMATS.values()]))
codec.declare(importer(list(CODECS.values())))
