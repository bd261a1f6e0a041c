"""Quantize and evaluate a model larger than RAM in float32: proof that both stream.

    python benchmarks/bench_eval_memory.py [--hidden 4096] [--intermediate 11008] [--blocks 32]
        [--heads 32] [--kv-heads 32] [--streams on] [--ctx 256] [--windows 2] [--workdir DIR]
        [--keep]

    python benchmarks/bench_eval_memory.py --hidden 256 --intermediate 512 --blocks 4 \\
        --heads 4 --kv-heads 4 --streams off,on          # a quick check at a tiny size

Builds a synthetic llama checkpoint on disk with ``bench_memory.build_checkpoint`` (random fp16
weights written one block at a time; the sample model's tokenizer and vocabulary). The default
shape is Llama-2-7B's with SmolLM2's 49,152-token vocabulary: 6.9 B parameters, 27.5 GB in
float32, more than this machine's RAM. Then, each in a child process measured by ``wait4`` (wall
seconds, peak RSS): ``quantbench convert`` with a data-free method (``zeropoint`` w4 g128 in the
``gptq`` layout), and ``quantbench eval OUTPUT --baseline CHECKPOINT --stream S`` for each
``--streams`` value (default ``on``; ``off`` loads both models whole in float32 and is refused
above the machine's RAM unless ``--force``). Perplexity and KLD come from the eval's ``--json``.
Writes benchmarks/results/eval_memory.json and prints a table. The checkpoint and the quantized
output are deleted afterwards unless ``--keep`` (with ``--workdir`` a kept checkpoint is reused).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import run_measured
from bench_memory import build_checkpoint
from rich.console import Console
from rich.table import Table

CLI = [sys.executable, "-m", "quantbench.cli"]


def ram_bytes() -> int:
    """MemTotal from /proc/meminfo (the machine's RAM, not what is free now)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan(cmd: list[str], path: Path) -> dict | None:
    """``eval --plan``'s estimate (peak memory of each mode, the mode chosen), or None."""
    proc = subprocess.run([*cmd, "--plan", "--json", str(path)], capture_output=True, text=True)
    return json.loads(path.read_text()) if proc.returncode == 0 and path.is_file() else None


def shape_params(a: argparse.Namespace, vocab: int) -> int:
    head_dim = a.hidden // a.heads
    block = (2 * a.hidden * a.hidden + 2 * a.kv_heads * head_dim * a.hidden
             + 3 * a.hidden * a.intermediate + 2 * a.hidden)
    return a.blocks * block + 2 * vocab * a.hidden + a.hidden


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", "--inter", dest="intermediate", type=int, default=11008)
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--method", default="zeropoint", help="a data-free method (default zeropoint)")
    ap.add_argument("--format", default="gptq")
    ap.add_argument("--streams", default="on", help="eval --stream values, comma-separated")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--force", action="store_true",
                    help="run --stream off even when float32 exceeds the machine's RAM")
    ap.add_argument("--workdir", default=None,
                    help="where the checkpoint and output go (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true",
                    help="keep (and, with --workdir, reuse) the synthetic checkpoint and output")
    ap.add_argument("--out", default="benchmarks/results/eval_memory.json")
    args = ap.parse_args()
    from quantbench.models.loader import load_model

    console = Console()
    sample = Path(load_model("sample:smollm2").path)
    vocab = json.loads((sample / "config.json").read_text())["vocab_size"]
    params = shape_params(args, vocab)
    ram, fp32 = ram_bytes(), 4 * params
    streams = [s.strip() for s in args.streams.split(",") if s.strip()]
    if "off" in streams and 2 * fp32 > ram and not args.force:
        raise SystemExit(f"--stream off holds two models of {fp32 / 2**30:.1f} GiB in float32 "
                         f"on a machine of {ram / 2**30:.1f} GiB: leave it out or pass --force")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="qb-evalmem-"))
    root.mkdir(parents=True, exist_ok=True)
    src, dst = root / "synthetic-llama", root / f"synthetic-{args.method}-{args.format}"
    need = 2 * params * 1.3  # fp16 checkpoint + a 4-bit output with 16-bit embeddings, roughly
    free = shutil.disk_usage(root).free
    reuse = args.keep and (src / "model.safetensors.index.json").is_file()
    if not reuse and free < need:
        raise SystemExit(f"{root} has {free / 1e9:.1f} GB free, about {need / 1e9:.1f} GB needed")
    convert_cmd = [*CLI, "convert", str(src), "--method", args.method, "--bits", "4",
                   "--group-size", "128", "--format", args.format, "-o", str(dst), "--overwrite"]
    evals = []
    try:
        start = time.perf_counter()
        if reuse:
            console.print(f"reusing {src}")
        else:
            console.print(f"building {params / 1e9:.2f} B parameters in {src} ...")
            built = build_checkpoint(src, args.blocks, args.hidden, args.intermediate,
                                     args.heads, args.kv_heads, sample)
            assert built == params, (built, params)
        build_s = time.perf_counter() - start
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        console.print(f"checkpoint: {size / 2**30:.2f} GiB fp16 ({fp32 / 2**30:.2f} GiB in "
                      f"float32, RAM {ram / 2**30:.2f} GiB), built in {build_s:.0f} s")
        convert = run_measured(convert_cmd)
        console.print(f"convert: {convert['seconds']} s, peak RSS {convert['peak_rss_mb']} MB")
        out_size = dir_bytes(dst)
        for stream in streams:
            report = root / f"eval-{stream}.json"
            cmd = [*CLI, "eval", str(dst), "--baseline", str(src), "--ctx", str(args.ctx),
                   "--windows", str(args.windows), "--max-tokens", "0", "--stream", stream]
            estimate = plan(cmd, root / f"plan-{stream}.json")
            cmd += ["--no-cache", "--json", str(report)]
            run = run_measured(cmd)
            data = json.loads(report.read_text())
            result = next(iter(data["results"].values()))
            evals.append({"stream": stream, "command": cmd[3:], **run,
                          "baseline_ppl": data["baseline"]["ppl"], "ppl": result["ppl"],
                          "kld_mean": result["kld_mean"], "top1": result["top1"],
                          "n_tokens": result["n_tokens"],
                          "eval_seconds": {"baseline": round(data["baseline"]["seconds"], 3),
                                           "candidate": round(result["seconds"], 3)},
                          "mode": data.get("mode"), "plan": estimate})
            console.print(f"eval --stream {stream}: {run['seconds']} s, "
                          f"peak RSS {run['peak_rss_mb']} MB")
    finally:
        if not args.keep:  # only what this script made: a --workdir itself stays
            for path in [src, dst, *root.glob("eval-*.json"), *root.glob("plan-*.json")]:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
            if not args.workdir:
                root.rmdir()
    payload = {"benchmark": "eval_memory", "parameters": params,
               "shape": {k: getattr(args, k) for k in ("hidden", "intermediate", "blocks",
                                                       "heads", "kv_heads")} | {"vocab": vocab},
               "fp32_bytes": fp32, "checkpoint_bytes": size, "output_bytes": out_size,
               "build_seconds": round(build_s, 1), "ram_bytes": ram,
               "fp32_exceeds_ram": fp32 > ram,
               "convert": {"command": convert_cmd[3:], **convert},
               "eval": evals, "protocol": {"ctx": args.ctx, "windows": args.windows},
               "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))
    show(payload, console)
    console.print(f"wrote {args.out}")


def show(p: dict, console: Console) -> None:
    gib = 2**30
    table = Table(title=f"{p['parameters'] / 1e9:.2f} B params: fp32 {p['fp32_bytes'] / gib:.1f} "
                        f"GiB, RAM {p['ram_bytes'] / gib:.1f} GiB",
                  caption=f"peak RSS (wait4); fp16 checkpoint {p['checkpoint_bytes'] / gib:.2f} "
                          f"GiB, output {p['output_bytes'] / gib:.2f} GiB; eval "
                          f"{p['protocol']['windows']} "
                          f"× {p['protocol']['ctx']} tokens")
    for col in ("step", "wall s", "RSS GiB", "/ fp32", "ppl", "base ppl", "KLD", "top-1 %"):
        table.add_column(col, justify="left" if col == "step" else "right",
                         no_wrap=col == "step")
    c = p["convert"]
    table.add_row(f"convert {c['command'][3]}", f"{c['seconds']:.1f}",
                  f"{c['peak_rss_mb'] / 1024:.2f}",
                  f"{c['peak_rss_mb'] * 2**20 / p['fp32_bytes']:.2f}", "", "", "", "")
    for e in p["eval"]:
        table.add_row(f"eval {e['stream'] or '(default)'} ({e['mode'] or '?'})",
                      f"{e['seconds']:.1f}",
                      f"{e['peak_rss_mb'] / 1024:.2f}",
                      f"{e['peak_rss_mb'] * 2**20 / p['fp32_bytes']:.2f}",
                      f"{e['ppl']:.5g}", f"{e['baseline_ppl']:.5g}", f"{e['kld_mean']:.4f}",
                      f"{100 * e['top1']:.2f}")
    console.print(table)
    for e in p["eval"]:
        if e["plan"]:
            console.print(f"eval {e['stream']}: eval --plan estimated "
                          f"{e['plan']['whole_bytes'] / 2**30:.2f} GiB whole, "
                          f"{e['plan']['streamed_bytes'] / 2**30:.2f} GiB streamed; measured "
                          f"peak RSS {e['peak_rss_mb'] / 1024:.2f} GiB ({e['mode']})")


if __name__ == "__main__":
    main()
