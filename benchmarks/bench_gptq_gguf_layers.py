"""Layer-level view of GPTQ onto GGUF types on the sample: for real SmolLM2 linears and their
calibration Hessians, the output-error proxy ``tr((W − Q) H (W − Q)ᵀ)`` of GPTQ (act-order on
a grid fitted first; without act-order; and with each super-block fitted when the sweep
reaches it) relative to llama.cpp's importance-weighted RTN (imatrix) on the same type.

It explains the Q4_K_M numbers: the sample's weights were shipped on a Q4_1 grid (groups of
32, scale + min), which Q4_K (sub-blocks of 32, scale + min) nearly reproduces, so there is
little error left for GPTQ to remove on Q4_K; Q6_K and Q3_K show what it does elsewhere.
Writes JSON and prints a table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from quantbench.calibration.data import CalibrationSpec, sample_windows
from quantbench.models.loader import load_model
from quantbench.quant.gguf.codec import get_codec
from quantbench.quant.gguf.gptq_grid import (decode, default_importance, element_grids,
                                             fit_rows, gptq_gguf)
from quantbench.quant.gptq import GPTQParams, column_sweep, inverse_hessian_cholesky

LINEARS = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]


def hessians(model_dir: Path, tokenizer, layers: list[int], samples: int, length: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    windows = sample_windows(tokenizer, CalibrationSpec(samples, length, 0, None, False))
    acc: dict[tuple[int, str], list] = {}
    hooks = []
    for layer in layers:
        for name in LINEARS:
            def hook(mod, inp, out, key=(layer, name)):
                x = inp[0].reshape(-1, inp[0].shape[-1]).double()
                h, n = acc.get(key, (0.0, 0))
                acc[key] = (h + 2 * x.T @ x, n + x.shape[0])
            hooks.append(model.model.layers[layer].get_submodule(name).register_forward_hook(hook))
    with torch.inference_mode():
        for i in range(0, windows.shape[0], 4):
            model(windows[i:i + 4])
    for h in hooks:
        h.remove()
    weights = {key: model.model.layers[key[0]].get_submodule(key[1]).weight.detach().float()
               for key in acc}
    return {key: (weights[key], (h / n).float()) for key, (h, n) in acc.items()}


def h_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    E = (W - Q).double()
    return float(torch.einsum("ij,jk,ik->", E, H.double(), E))


def gptq_fit_as_reached(W: torch.Tensor, H: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """GPTQ without act-order, each super-block fitted on the error-updated weights when the
    sweep reaches it (GPTQ's "dynamic groups" on a GGUF type); the dequantized weight."""
    codec = get_codec(ggml_type)
    W, H = W.clone(), H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    imp = default_importance(H, dead)
    hinv, _, _ = inverse_hessian_cholesky(H, 0.01)
    B, deq, grid = codec.block_size, torch.empty_like(W), {}

    def round_col(w, j, upcoming):
        if j % B == 0:
            block = upcoming()[:, :B].contiguous()
            grid["g"] = element_grids(codec, fit_rows(codec, block, imp[j:j + B]), block.shape,
                                      torch.arange(B))
        s, o, f = (x[:, j % B] for x in grid["g"])
        q = codec.round_to_grid(w, s, o, f)
        deq[:, j] = decode(codec, q, s, o)
        return deq[:, j], q

    column_sweep(W, hinv, 128, round_col)
    return deq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="sample:smollm2")
    ap.add_argument("--layers", default="3,15,27")
    ap.add_argument("--types", default="Q4_K,Q6_K,Q3_K")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--out", default="benchmarks/results/gptq_gguf_layers_smollm2.json")
    args = ap.parse_args()
    start = time.perf_counter()
    model = load_model(args.source)
    layers = [int(x) for x in args.layers.split(",")]
    types = args.types.split(",")
    stats = hessians(model.path, model.tokenizer(), layers, args.calib_samples, args.calib_len)
    rows = []
    for (layer, name), (W, H) in stats.items():
        in_f = W.shape[1]
        for t in types:
            codec = get_codec(t)
            if in_f % codec.block_size:
                continue
            deq = lambda data: codec.dequantize_rows(data, in_f)  # noqa: E731
            base = h_error(W, deq(codec.quantize_rows(W, torch.diag(H))), H)
            rows.append({
                "layer": layer, "linear": name, "type": t, "imatrix_rtn_error": base,
                "gptq_act_order": h_error(W, deq(gptq_gguf(W, H, t)[0]), H) / base,
                "gptq_no_act_order": h_error(W, deq(gptq_gguf(
                    W, H, t, GPTQParams(act_order=False))[0]), H) / base,
                "gptq_fit_as_reached": h_error(W, gptq_fit_as_reached(W, H, t), H) / base})
    variants = ("gptq_act_order", "gptq_no_act_order", "gptq_fit_as_reached")
    summary = {t: {v: sum(r[v] for r in rows if r["type"] == t) /
                   max(1, sum(r["type"] == t for r in rows)) for v in variants} for t in types}
    table = Table(title="GPTQ onto GGUF types: output-error proxy relative to imatrix RTN "
                        "(mean over linears; lower is better)")
    table.add_column("type")
    for v in variants:
        table.add_column(v.replace("_", " "), justify="right")
    for t in types:
        table.add_row(t, *(f"{summary[t][v]:.3f}" for v in variants))
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "gptq_gguf_layers", "source": args.source, "layers": layers,
        "calibration": {"samples": args.calib_samples, "len": args.calib_len, "seed": 0},
        "metric": "tr((W-Q) H (W-Q)^T) / same for imatrix RTN on the same type",
        "summary": summary, "rows": rows, "seconds": round(time.perf_counter() - start, 1)},
        indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
