"""Evaluation throughput: quantbench's evaluator against llama-perplexity, same model and tokens.

    python benchmarks/bench_eval_throughput.py [--model sample:smollm2] [--ctx 512] [--chunks 16]
        [--threads 2] [--streams off,on] [--repeat 1] [--workdir DIR] [--out FILE]

    python benchmarks/bench_eval_throughput.py --chunks 2      # a quick check

The source is written as an F16 GGUF (``quantbench convert --type F16``: the same fp16 values as
the checkpoint) and scored by ``llama-perplexity -c CTX --chunks N -t THREADS``; quantbench's
evaluator scores the checkpoint alone with llama.cpp's windowing (``eval --scoring half --ctx
CTX --windows N --max-tokens 0 --no-cache``: the same chunks, the same scored second halves), once
per ``--streams`` value (``eval --stream S``), with ``OMP_NUM_THREADS=THREADS``. Each runs in a child process
measured by ``wait4`` (wall seconds, peak RSS). Compute time is what each tool reports itself:
llama-perplexity's log timestamps from "calculating perplexity" to "Final estimate" (its warm-up
and tokenization excluded; its "seconds per pass" is kept too), quantbench's per-model
``seconds`` in its eval JSON (the forwards and the head, not the load). Tokens per second are
``chunks × ctx`` (tokens run through the model) over each time; with ``--repeat N`` each tool
runs N times and the run with the least compute time is reported (all are kept). Writes
benchmarks/results/eval_throughput.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import run_measured, spawn_measured
from rich.console import Console
from rich.table import Table

from quantbench.eval.data import load_eval_text
from quantbench.eval.report import write_json
from quantbench.models.loader import load_model
from quantbench.runtimes import llamacpp

CLI = [sys.executable, "-m", "quantbench.cli"]
STAMP = r"^(\d+)\.(\d+)\.(\d+)\.(\d+) .*?"  # llama.cpp's log timestamp: min.s.ms.us


def stamp(log: str, text: str) -> float | None:
    """Seconds since start of the first log line that contains ``text``."""
    m = re.search(STAMP + re.escape(text), log, re.MULTILINE)
    if not m:
        return None
    mins, secs, ms, us = map(int, m.groups())
    return mins * 60 + secs + ms / 1e3 + us / 1e6


def number(pattern: str, log: str) -> float | None:
    m = re.search(pattern, log)
    return float(m.group(1)) if m else None


def run_logged(cmd: list[str], env: dict) -> tuple[dict, str]:
    """``cmd`` in a child; wall seconds, peak RSS (``_measure.spawn_measured``) and its output
    (to a file, never a pipe that could fill)."""
    with tempfile.TemporaryFile() as log:
        code, seconds, peak = spawn_measured(cmd, log, subprocess.STDOUT, env)
        log.seek(0)
        text = log.read().decode(errors="replace")
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}\n{text[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak, 1)}, text


def llama_perplexity(tools, gguf: Path, text: Path, ctx: int, chunks: int, threads: int) -> dict:
    cmd = [str(tools.tool("llama-perplexity")), "-m", str(gguf), "-f", str(text), "-c", str(ctx),
           "-t", str(threads), "--chunks", str(chunks), "--log-timestamps"]
    env = {"LD_LIBRARY_PATH": str(tools.bin_dir)}
    for _attempt in range(3):  # llama.cpp's logger thread now and then loses the last lines
        run, log = run_logged(cmd, env)
        if "Final estimate" in log:
            break
    else:
        raise SystemExit(f"llama-perplexity printed no final estimate:\n{log[-2000:]}")
    begin, end = stamp(log, "calculating perplexity over"), stamp(log, "Final estimate")
    n_seq = int(number(r"n_seq=(\d+)", log) or 1)
    per_pass, passes = number(r"([0-9.]+) seconds per pass", log), math.ceil(chunks / n_seq)
    if begin is None or end is None:  # no timestamps: its first pass's time × passes
        compute, timing = per_pass * passes, "seconds per pass × passes"
    else:
        compute, timing = end - begin, "log timestamps, calculating → Final estimate"
    return {"command": cmd[1:], **run, "ppl": number(r"Final estimate: PPL = ([0-9.]+)", log),
            "chunks": int(number(r"calculating perplexity over (\d+) chunks", log) or 0),
            "compute_seconds": round(compute, 3), "timing": timing,
            "seconds_per_pass": per_pass, "passes": passes, "n_seq": n_seq}


def ours(source: str, work: Path, ctx: int, chunks: int, threads: int,
         stream: str | None) -> dict:
    report = work / f"ours-{stream or 'default'}.json"
    cmd = [*CLI, "eval", source, "--ctx", str(ctx), "--windows", str(chunks), "--max-tokens",
           "0", "--scoring", "half", "--no-cache", "--json", str(report),
           *(["--stream", stream] if stream else [])]
    env = {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    run = run_measured(cmd, env=env, digits=2)
    data = json.loads(report.read_text())
    base = data["baseline"]
    return {"stream": stream, "command": cmd[3:], **run, "ppl": base["ppl"],
            "n_tokens_scored": base["n_tokens"], "compute_seconds": round(base["seconds"], 3),
            "protocol_text": data.get("protocol_text"),
            "mode": data.get("mode")}


def best(repeat: int, fn, *args) -> dict:
    """``fn(*args)`` ``repeat`` times: the run with the least compute time, with every run's
    compute and wall seconds (the machine may be shared: the least is the least disturbed)."""
    runs = [fn(*args) for _ in range(max(1, repeat))]
    return {**min(runs, key=lambda r: r["compute_seconds"]),
            "compute_seconds_runs": [r["compute_seconds"] for r in runs],
            "wall_seconds_runs": [r["seconds"] for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", "--source", dest="source", default="sample:smollm2")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", default="off,on", help="eval --stream values, comma-separated")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each; the one with the least compute time is reported")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default="benchmarks/results/eval_throughput.json")
    args = ap.parse_args()
    console = Console()
    tools = llamacpp.ensure()
    model = load_model(args.source)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qb-evaltp-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        payload = measure(args, tools, model, work, console)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    write_json(Path(args.out), payload)
    show(payload, console)
    console.print(f"wrote {args.out}")


def measure(args: argparse.Namespace, tools, model, work: Path, console: Console) -> dict:
    gguf, text = work / "f16.gguf", work / "wiki.test.raw"
    text.write_text(load_eval_text(None).text)
    convert = run_measured([*CLI, "convert", args.source, "--type", "F16", "-o", str(gguf),
                            "--overwrite"])
    tokens = args.chunks * args.ctx
    llama = best(args.repeat, llama_perplexity, tools, gguf, text, args.ctx, args.chunks,
                 args.threads)
    console.print(f"llama-perplexity: ppl {llama['ppl']}, {llama['compute_seconds']} s "
                  f"computing, {llama['seconds']} s wall")
    streams = [s.strip() for s in args.streams.split(",") if s.strip()]
    rows = []
    for stream in streams:
        r = best(args.repeat, ours, str(model.path), work, args.ctx, args.chunks, args.threads,
                 stream)
        console.print(f"quantbench --stream {stream or '-'}: ppl {r['ppl']:.4f}, "
                      f"{r['compute_seconds']} s computing, {r['seconds']} s wall")
        rows.append(r)
    for r in [llama, *rows]:
        r["tokens_per_second"] = round(tokens / r["compute_seconds"], 1)
        r["tokens_per_second_wall"] = round(tokens / r["seconds"], 1)
    for r in rows:
        r["ratio_vs_llama_cpp"] = round(r["tokens_per_second"] / llama["tokens_per_second"], 3)
        r["ratio_vs_llama_cpp_wall"] = round(r["tokens_per_second_wall"]
                                             / llama["tokens_per_second_wall"], 3)
        r["ppl_diff_pct"] = round(100 * (r["ppl"] / llama["ppl"] - 1), 4)
        scored = args.chunks * (args.ctx - args.ctx // 2 - 1)
        if llama["chunks"] != args.chunks or r["n_tokens_scored"] != scored:
            console.print(f"[red]not the same windows: llama.cpp {llama['chunks']} chunks, ours "
                          f"{r['n_tokens_scored']} scored tokens (expected {scored})[/]")
        if abs(r["ppl_diff_pct"]) > 0.5:
            console.print(f"[red]perplexities differ by {r['ppl_diff_pct']:+.2f} %[/]")
    payload = {"benchmark": "eval_throughput", "source": args.source,
               "protocol": {"ctx": args.ctx, "chunks": args.chunks, "tokens": tokens,
                            "scored_per_chunk": args.ctx - args.ctx // 2 - 1,
                            "scoring": "llama-perplexity (second half)",
                            "threads": args.threads, "repeat": args.repeat},
               "gguf": {"file": "F16 via quantbench convert --type F16",
                        "bytes": gguf.stat().st_size, **convert},
               "llama_cpp": {"version": tools.version, **llama}, "quantbench": rows,
               "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "cpu": cpu_name()}}
    return payload


def cpu_name() -> str | None:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def show(p: dict, console: Console) -> None:
    pr = p["protocol"]
    table = Table(title=f"{p['source']} F16: {pr['chunks']} chunks × {pr['ctx']}, "
                        f"{pr['threads']} threads",
                  caption="ours: --stream off/on. tok/s: chunks × ctx "
                          "over each tool's own compute time (comp s); ratio: ours / llama.cpp; "
                          "wall: the whole child process, load included (its tok/s and ratio "
                          "in the JSON)")
    for col in ("who", "ppl", "Δ %", "comp s", "tok/s", "ratio", "wall s", "RSS MB"):
        table.add_column(col, justify="left" if col == "who" else "right", no_wrap=col == "who")
    ll = p["llama_cpp"]
    table.add_row("llama.cpp", f"{ll['ppl']:.4f}", "", f"{ll['compute_seconds']:.2f}",
                  f"{ll['tokens_per_second']:.0f}", "1", f"{ll['seconds']:.1f}",
                  f"{ll['peak_rss_mb']:.0f}")
    for r in p["quantbench"]:
        table.add_row(f"ours {r['stream'] or ''}", f"{r['ppl']:.4f}",
                      f"{r['ppl_diff_pct']:+.2f}", f"{r['compute_seconds']:.2f}",
                      f"{r['tokens_per_second']:.0f}", f"{r['ratio_vs_llama_cpp']:.2f}",
                      f"{r['seconds']:.1f}", f"{r['peak_rss_mb']:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
