"""The method options of ``quantbench convert`` as click options: shared by the CLI
(``cli.py``) and the command line rebuilt from a manifest (``hub/command.py``), so neither
imports the other."""
from __future__ import annotations

import click


def calibration_options(f):
    """The method options of ``quantbench convert`` (each a field of a method's options
    dataclass), as click options on ``f``."""
    options = [
        click.option("--act-order/--no-act-order", default=None,
                     help="GPTQ: columns by descending Hessian diagonal (default on)."),
        click.option("--static-groups/--dynamic-groups", default=None,
                     help="GPTQ: group scales fixed in original column order before act-order (default; no g_idx), or formed in processing order with a g_idx (--dynamic-groups, the original GPTQ)."),
        click.option("--scale-search/--no-scale-search", default=None,
                     help="GPTQ: shrink each group's range where that lowers the diag(H)-"
                          "weighted rounding error (default on; off = plain min/max)."),
        click.option("--attention-values/--input-values", "attention_values", default=None,
                     help="GPTQ: v_proj rows per kv head on the Hessian of the attention-"
                          "weighted inputs they are read with (default on GGUF types; opt-in "
                          "on integer grids), or on the plain input Hessian."),
        click.option("--damp", "damp_percent", type=float, default=None,
                     help="GPTQ: dampening as a fraction of the mean Hessian diagonal (0.01)."),
        click.option("--block-size", "block_size", type=int, default=None,
                     help="GPTQ/exl2: columns per lazy-batch update (gptq 128, exl2 32)."),
        click.option("--calib-samples", type=int, default=None, help="Calibration windows (gptq 128, awq 32)."),
        click.option("--calib-len", type=int, default=None, help="Tokens per window (512)."),
        click.option("--calib-data", type=str, default=None,
                     help="Calibration text: .txt, .jsonl, or hf:NAME[:CONFIG[:SPLIT]] "
                          "(bundled C4 sample)."),
        click.option("--calib-chat-template", is_flag=True, default=None,
                     help="Wrap each calibration document in the tokenizer's chat template."),
        click.option("--seed", "calib_seed", type=int, default=None, help="Sampling seed (0)."),
        click.option("--device", type=str, default=None,
                     help="Calibrated methods: where blocks, statistics and solves run: auto "
                          "(a CUDA GPU when torch sees one, else cpu), cpu, cuda, cuda:N."),
        click.option("--then", type=click.Choice(["rtn", "gptq"]), default=None,
                     help="AWQ: the method that picks the codes after scaling (rtn); with "
                          "gptq every GPTQ flag applies (defaults under AWQ: --no-act-order, "
                          "--static-groups, --input-values)."),
        click.option("--awq-grid", "n_grid", type=int, default=None,
                     help="AWQ: grid points for the scale exponent (20)."),
        click.option("--clip/--no-clip", default=None, help="AWQ: search weight clipping (on)."),
        click.option("--exhaustive-search", "exhaustive", is_flag=True, default=None,
                     help="AWQ: evaluate every grid point (default: coarse grid + refinement)."),
        click.option("--search-samples", type=int, default=None,
                     help="AWQ: windows the scale search runs on (8)."),
        click.option("--search-file", type=str, default=None,
                     help="AWQ: re-apply a saved awq_search.safetensors instead of searching."),
        click.option("--imatrix", "imatrix_file", type=str, default=None,
                     help="imatrix: a llama.cpp imatrix file (llama-imatrix's .gguf or legacy "
                          ".dat) instead of calibration; implies --method imatrix."),
        click.option("--bpw", type=float, default=None,
                     help="exl2: target bits per weight over the decoder linears; a measurement "
                          "picks each layer's mix of 2-8 bit widths (e.g. 4.65)."),
        click.option("--measurement", type=str, default=None,
                     help="exl2: the measurement JSON to reuse (complete), resume (unfinished) "
                          "or write (absent); default: one in the quantbench cache."),
        click.option("--measure-samples", type=int, default=None,
                     help="exl2: calibration windows the measurement runs on (16)."),
        click.option("--double-quant", "double_quant", is_flag=True, default=None,
                     help="nf4/fp4: quantize the absmax values too (bitsandbytes' double quant)."),
        click.option("--threshold", type=float, default=None,
                     help="llm_int8: activation magnitude from which a column runs in 16-bit "
                          "at run time (6.0; 0 = no decomposition)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


FLAGS = {"n_grid": "--awq-grid", "damp_percent": "--damp", "calib_seed": "--seed",
         "static_groups": "--static-groups/--dynamic-groups", "imatrix_file": "--imatrix",
         "attention_values": "--attention-values/--input-values"}


def method_params() -> dict[str, click.Parameter]:
    """``{option field name: click parameter}`` for every option :func:`calibration_options`
    adds (what ``convert`` parses a method option with)."""
    return {p.name: p for p in calibration_options(lambda: None).__click_params__}
