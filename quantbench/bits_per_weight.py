"""Bits per weight, defined once: the two numbers every report shows, each with its label.

``bits_per_weight_quantized`` — *in the quantized tensors*: the storage bits of the tensors
quantbench quantized (their codes plus every scale, zero-point, ``g_idx``, absmax or block
header the format stores for them; for a GGUF tensor, its blocks' bytes × 8) divided by their
number of weights. Which tensors are quantized is the run's choice: with the default targets
the decoder's linear layers; with a GGUF type (``--type`` quantizes every 2-D tensor) or
``--quantize-embeddings`` / ``--quantize-lm-head``, the embeddings and lm_head too. So this
number compares grids, not files: int4 g64 reads 4.31 whatever the model's embedding costs.

``bits_per_weight`` — *over all weights*: the same storage bits summed over every weight tensor
in the artifact, quantized or kept at its float width (embeddings, norms, an lm_head left in
16-bit), divided by all weights: what the model's weights cost per parameter, the number to
compare files with (on SmolLM2-135M, compressed-tensors int4 g64 keeps its 28M-weight
embedding in fp16: 4.31 in the quantized tensors, 6.78 over all weights; GGUF Q4_K_M
quantizes it: 6.16 and 6.17). What a file holds besides tensors (GGUF metadata and
vocabulary, config, tokenizer) is in neither: the size in bytes says that.

Every writer (GGUF included) computes both from the manifest's per-tensor rows
(:func:`summarize`), ``inspect`` from the tensors it reads back; the JSON keys are those of
every manifest so far, and the labels below are the only wording reports use.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

QUANTIZED_KEY = "bits_per_weight_quantized"
ALL_KEY = "bits_per_weight"
QUANTIZED_LABEL = "bits/weight in quantized tensors"
ALL_LABEL = "bits/weight over all weights"
# table headers where a column is narrow
QUANTIZED_HEADER = "bits/w quant."
ALL_HEADER = "bits/w all"


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def mean_bits(rows: Iterable[Mapping[str, Any]]) -> tuple[int, float]:
    """(weights, mean bits per weight) of manifest tensor rows (``shape``,
    ``bits_per_weight``); 0 weights gives a mean of 0."""
    n = bits = 0
    for row in rows:
        numel = _numel(row["shape"])
        n += numel
        bits += numel * row["bits_per_weight"]
    return n, (bits / n if n else 0.0)


def summarize(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The manifest summary's counts and both bits per weight, from its per-tensor rows."""
    quant = [r for r in rows.values() if r["quantized"]]
    n_q, bits_q = mean_bits(quant)
    n_all, bits_all = mean_bits(rows.values())
    return {
        "quantized_tensors": len(quant),
        "quantized_weights": n_q,
        "total_weights": n_all,
        QUANTIZED_KEY: round(bits_q, 4) if n_q else None,
        ALL_KEY: round(bits_all, 4) if n_all else None,
    }


def describe(summary: Mapping[str, Any]) -> str:
    """Both numbers in one phrase: ``4.31 bits/weight in quantized tensors, 6.78 over all
    weights`` (a missing one reads ``?``)."""
    def num(key: str) -> str:
        value = summary.get(key)
        return "?" if value is None else f"{value:.2f}"

    return f"{num(QUANTIZED_KEY)} {QUANTIZED_LABEL}, {num(ALL_KEY)} over all weights"


def pick(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The two keys of a summary, for a report's JSON."""
    return {QUANTIZED_KEY: summary.get(QUANTIZED_KEY), ALL_KEY: summary.get(ALL_KEY)}
