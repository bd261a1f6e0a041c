"""GPTQ onto a GGUF block type: fit the blocks once, then GPTQ's column sweep on their grid.

A ggml block type's grid is per element: once a block's parameters are chosen (k-quants: the
super-block ``d``/``dmin`` and the sub-block scales/mins; legacy types: ``d`` and ``m``), every
element decodes to ``scale·(code − zero_point) − offset`` with a known ``(scale, offset)``.
:func:`gptq_gguf` therefore

1. fits every block on the original weights with the codec's own (importance-weighted) search,
   using ``diag(H)`` as the importance vector when none is given (llama.cpp's imatrix is the mean
   ``x²`` per input column and ``diag(H) = 2·mean x²``; the searches are scale-free);
2. runs GPTQ's column sweep (:func:`quantbench.quant.gptq.column_sweep`, act-order allowed: the
   grid is fixed, so the order is free), rounding each column against its fixed per-element
   grid with the codec's ``round_to_grid`` (a k-quant sub-block whose ``d·sc`` is 0 keeps
   llama.cpp's fallback levels) and spreading the error over the columns still to come;
3. packs the codes with the fitted parameters into the exact ggml block bytes.

Float types (F32/F16/BF16) have no grid to search and are encoded directly. Pure tensor maths.
"""
from __future__ import annotations

import dataclasses
from dataclasses import fields
from typing import Any

from quantbench.lazy import torch
from quantbench.quant.gguf.codec import BlockCodec, get_codec
from quantbench.quant.gguf.legacy import _LegacyCodec, row_sigma2
from quantbench.quant.gptq import (SINGLE_THREAD_ELEMENTS, GPTQParams, GPTQStats, Upcoming,
                                   column_sweep, row_parts, shared_inverse)
from quantbench.threads import run_chunks, single_threaded

FLOAT_TYPES = ("F32", "F16", "BF16")
_FIT_CHUNK = 512  # blocks of 256 per fit pass (the k-quant searches' temporaries)


def gptq_gguf(weight: torch.Tensor, hessian: torch.Tensor, ggml_type: str,
              params: GPTQParams | None = None, importance: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, GPTQStats]:
    """Quantize ``weight [out, in]`` onto ``ggml_type`` with GPTQ given the Hessian
    ``H = 2·XᵀX/n [in, in]``; returns ``(block bytes uint8 [out, row_bytes], stats)``.

    ``importance [in]`` weights the block searches (default: ``diag(H)``); like integer GPTQ,
    a weight of up to ``SINGLE_THREAD_ELEMENTS`` runs on one CPU thread."""
    data, stats, _ = gptq_gguf_rows(weight, hessian, ggml_type, params, importance)
    return data, stats


def gptq_gguf_rows(weight: torch.Tensor, hessian: torch.Tensor, ggml_type: str,
                   params: GPTQParams | None = None, importance: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, GPTQStats, torch.Tensor]:
    """:func:`gptq_gguf` plus each row's share of the proxy error ``[out]`` (for weights
    stacked row-wise into one sweep and split afterwards)."""
    params = GPTQParams() if params is None else params
    inverse = None if ggml_type in FLOAT_TYPES else shared_inverse(hessian, params)
    parts = row_parts(weight)
    if len(parts) == 1:
        if weight.numel() <= SINGLE_THREAD_ELEMENTS:
            with single_threaded(weight.device):
                return _gptq_gguf(weight, hessian, ggml_type, params, importance, inverse)
        return _gptq_gguf(weight, hessian, ggml_type, params, importance, inverse)
    done: dict[int, tuple[torch.Tensor, GPTQStats, torch.Tensor]] = {}

    def one(i: int) -> None:  # rows side by side on worker threads (block fits are per row)
        done[i] = _gptq_gguf(weight[parts[i]], hessian, ggml_type, params, importance,
                             inverse)

    run_chunks(one, range(len(parts)))
    pieces = [done[i] for i in range(len(parts))]
    losses = torch.cat([p[2] for p in pieces])
    stats = dataclasses.replace(pieces[0][1], proxy_error=float(losses.sum()))
    return torch.cat([p[0] for p in pieces]), stats, losses


def _gptq_gguf(weight: torch.Tensor, hessian: torch.Tensor, ggml_type: str,
               params: GPTQParams, importance: torch.Tensor | None,
               inverse: tuple[torch.Tensor, float, bool] | None
               ) -> tuple[torch.Tensor, GPTQStats, torch.Tensor]:
    """One row range; ``inverse`` is the rows' shared :func:`shared_inverse` (None for the
    float types, which have no sweep)."""
    codec = get_codec(ggml_type)
    if codec.name in FLOAT_TYPES:
        return codec.quantize_rows(weight), GPTQStats(0.0, False, 0.0), \
            torch.zeros(weight.shape[0])
    if not codec.gptq_capable:
        raise NotImplementedError(f"{codec.name} has no fit/round split for GPTQ")
    W = weight.float().clone()
    out_f, in_f = W.shape
    codec.check_row(in_f)
    diag = torch.diag(hessian).float().clone()
    dead = diag == 0
    diag[dead] = 1.0
    W[:, dead] = 0.0
    imp = default_importance(hessian, dead) if importance is None else importance.float()
    fitted = fit_rows(codec, W, imp if codec.name != "Q8_0" else None)
    order = torch.argsort(diag, descending=True) if params.act_order else torch.arange(in_f)
    scale, offset, fallback = element_grids(codec, fitted, W.shape, order)
    W = W[:, order]
    Hinv, damp, increased = inverse

    def round_col(w: torch.Tensor, j: int, _: Upcoming) -> tuple[torch.Tensor, torch.Tensor]:
        q = codec.round_to_grid(w, scale[:, j], offset[:, j], fallback[:, j])
        return decode(codec, q, scale[:, j], offset[:, j]), q

    q_proc, losses = column_sweep(W, Hinv, params.block_size, round_col)
    codes = torch.empty(out_f, in_f, dtype=torch.long)
    codes[:, order] = q_proc.long()
    data = codec.pack(codes.reshape(-1, codec.block_size), fitted)
    return data.reshape(out_f, -1), GPTQStats(damp, increased, float(losses.sum())), losses


def default_importance(hessian: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """``diag(H)`` as an imatrix, columns that never see an input floored to a tiny positive
    weight (llama.cpp's searches want some weight in every block)."""
    diag = torch.diag(hessian).float().clamp_min(0.0)
    floor = float(diag.mean()) * 1e-6 if float(diag.mean()) > 0 else 1.0
    return torch.where(dead | (diag <= 0), torch.full_like(diag, floor), diag)


def element_grids(codec: Any, fitted: Any, shape: torch.Size, order: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every element's fixed ``(scale, offset, fallback code)`` as ``[out, in]`` tensors, the
    columns in processing ``order``."""
    scale, offset = (t.reshape(shape) for t in codec.element_grid(fitted))
    fallback = fitted.fallback.reshape(shape)
    return scale[:, order], offset[:, order], fallback[:, order]


def decode(codec: BlockCodec, codes: torch.Tensor, scale: torch.Tensor,
           offset: torch.Tensor) -> torch.Tensor:
    """What the ggml dequantizer gives for ``codes`` on the per-element grid (float32)."""
    out = scale * (codes - codec.zero_point).float()
    return out - offset if codec.has_min else out


def fit_rows(codec: Any, w: torch.Tensor, importance: torch.Tensor | None) -> Any:
    """The codec's block fit over whole rows ``[rows, ne0]`` as ``quantize_rows`` does it
    (legacy ``_impl``: ``sigma2`` per row), in chunks; the params of all blocks in row order."""
    rows, cols = w.shape
    x = w.reshape(-1, codec.block_size)
    imp = None if importance is None else \
        importance.reshape(1, cols).expand(rows, cols).reshape(-1, codec.block_size)
    if isinstance(codec, _LegacyCodec):
        sigma2 = None if imp is None else \
            row_sigma2(w).repeat_interleave(cols // codec.block_size)
        return codec.fit(x, imp, sigma2)
    parts = [codec.fit(x[s:s + _FIT_CHUNK], None if imp is None else imp[s:s + _FIT_CHUNK])
             for s in range(0, x.shape[0], _FIT_CHUNK)]
    return _cat_params(parts)


def _cat_params(parts: list[Any]) -> Any:
    """Concatenate a list of same-type parameter dataclasses along the block dimension."""
    cls = type(parts[0])
    return cls(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)))
