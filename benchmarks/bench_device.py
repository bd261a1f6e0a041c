"""GPTQ on a CUDA GPU against the CPU: wall time, peak RSS, GPU peak memory, same quality.

    python benchmarks/bench_device.py [--shapes smollm2,1b] [--devices cpu,cuda]

Builds synthetic llama checkpoints on disk (random fp16 weights, the sample model's tokenizer;
see bench_memory.py) in two shapes — SmolLM2-135M's (hidden 576, 30 blocks) and Llama-3.2-1B's
(hidden 2048, 16 blocks) — and runs ``quantbench convert --method gptq --format gptq`` (w4 g128
zero-point, act-order + static groups, 128 × 512 calibration tokens) once per device, each in a
child process. The GPU runs also evaluate both artifacts on the same tokens to show the device
does not change quality. Writes JSON and prints a table. Needs a machine with a CUDA GPU for the
cuda rows; ``--devices cpu`` runs anywhere.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _measure import run_measured
from bench_memory import build_checkpoint
from rich.console import Console
from rich.table import Table

SHAPES = {  # blocks, hidden, intermediate, heads, kv heads
    "smollm2": (30, 576, 1536, 9, 3),
    "1b": (16, 2048, 8192, 32, 8),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="smollm2,1b")
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--cpu-shapes", default="smollm2",
                    help="shapes also run on the CPU (the 1b shape takes long there)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--tokenizer-from", default=None,
                    help="a checkpoint directory with tokenizer files (default: the sample model)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--out", default="benchmarks/results/device_gptq.json")
    args = ap.parse_args()
    import torch

    console = Console()
    if args.tokenizer_from:
        tok_dir = Path(args.tokenizer_from)
    else:
        from quantbench.models.loader import load_model
        tok_dir = Path(load_model("sample:smollm2").path)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="qb-devbench-"))
    devices = [d for d in args.devices.split(",") if d]
    rows = []
    for shape in args.shapes.split(","):
        blocks, hidden, inter, heads, kv = SHAPES[shape]
        src = root / f"synthetic-{shape}"
        start = time.perf_counter()
        if not (src / "model.safetensors.index.json").is_file():
            params = build_checkpoint(src, blocks, hidden, inter, heads, kv, tok_dir)
        else:
            params = None
        console.print(f"{shape}: checkpoint ready in {time.perf_counter() - start:.0f} s")
        outs = {}
        for device in devices:
            if device == "cpu" and shape not in args.cpu_shapes.split(","):
                continue
            dst = root / f"gptq-{shape}-{device.replace(':', '')}"
            cmd = [sys.executable, "-m", "quantbench.cli", "convert", str(src), "--method",
                   "gptq", "--bits", "4", "--group-size", "128", "--zero-point",
                   "--static-groups", "--calib-samples", str(args.calib_samples),
                   "--calib-len", str(args.calib_len), "--device", device, "--format", "gptq",
                   "-o", str(dst), "--overwrite"]
            run = run_measured(cmd)
            manifest = json.loads((dst / "quantbench.json").read_text())
            summary = manifest["summary"]
            outs[device] = dst
            rows.append({"shape": shape, "blocks": blocks, "hidden": hidden,
                         "parameters": params, "device": summary["quantize_device"],
                         "wall_s": run["seconds"], "quantize_s": summary["quantize_seconds"],
                         "peak_rss_mb": run["peak_rss_mb"],
                         "gpu_peak_mb": (round(summary["quantize_device_peak_bytes"] / 2**20, 1)
                                         if summary.get("quantize_device_peak_bytes") else None)})
            console.print(rows[-1])
        if args.eval_tokens and torch.cuda.is_available() and len(outs) > 1:
            from quantbench.eval.run import evaluate_one
            for device, dst in outs.items():
                r = evaluate_one(dst, baseline=str(src), use_cache=False, device="cuda",
                                 max_tokens=args.eval_tokens).results[dst.name]
                for row in rows:
                    if row["shape"] == shape and row["device"].startswith(device.split(":")[0]):
                        row.update(ppl=r.ppl, kld_mean=r.kld_mean)
    payload = {"benchmark": "device_gptq", "rows": rows, "args": vars(args),
               "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "torch": torch.__version__,
                           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                           else None}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))
    table = Table(title="GPTQ w4 g128, 128 × 512 calibration tokens: CPU vs GPU")
    for col in ("shape", "device", "wall s", "quantize s", "peak RSS GiB", "GPU peak GiB",
                "KLD"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["shape"], r["device"], f"{r['wall_s']:.1f}", f"{r['quantize_s']:.1f}",
                      f"{r['peak_rss_mb'] / 1024:.2f}",
                      f"{r['gpu_peak_mb'] / 1024:.2f}" if r["gpu_peak_mb"] else "",
                      f"{r['kld_mean']:.4f}" if "kld_mean" in r else "")
    console.print(table)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
