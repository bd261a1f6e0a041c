"""How long the commands that compute nothing take: --help, --version, list, convert --help,
usage errors and inspect, against the 1.5 s target (issue 21).

    python benchmarks/bench_cli_startup.py [--source sample:smollm2] [--runs 5]

Each command runs ``--runs`` times in a fresh interpreter (``python -m quantbench.cli``, as the
``quantbench`` script does); the median wall time is reported, with the fastest and slowest
run. ``inspect`` runs on artifacts written from ``--source`` once beforehand (not timed): a
GPTQ checkpoint (safetensors) and a GGUF, with and without checking their sha256 against the
manifest (the check reads every byte; the rest reads headers only). For scale, the table also
times a bare interpreter and ``import torch``, what every command paid before. Writes JSON and
prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 1.5


def commands(work: Path) -> list[tuple[str, list[str], int]]:
    """(label, quantbench arguments, expected exit code) of every timed command."""
    gptq, gguf = work / "gptq", work / "gguf" / "model.gguf"
    return [
        ("--help", ["--help"], 0),
        ("--version", ["--version"], 0),
        ("list", ["list"], 0),
        ("convert --help", ["convert", "--help"], 0),
        ("convert (missing argument)", ["convert"], 2),
        ("convert (unknown option)", ["convert", "x", "-o", "y", "--nope"], 2),
        ("inspect GPTQ", ["inspect", str(gptq)], 0),
        ("inspect GPTQ --tensors --json", ["inspect", str(gptq), "--tensors", "--json",
                                           str(work / "inspect.json")], 0),
        ("inspect GPTQ --no-verify", ["inspect", str(gptq), "--no-verify"], 0),
        ("inspect GGUF", ["inspect", str(gguf)], 0),
        ("inspect GGUF --no-verify", ["inspect", str(gguf), "--no-verify"], 0),
    ]


def timed(argv: list[str], expect: int, env: dict[str, str]) -> float:
    """Wall seconds of one run of ``argv`` (its output discarded); its exit code checked."""
    start = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                          cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != expect:
        raise SystemExit(f"exit {proc.returncode}, expected {expect}: {' '.join(argv)}\n"
                         f"{proc.stderr.decode(errors='replace')[-2000:]}")
    return seconds


def build_artifacts(source: str, work: Path, env: dict[str, str], console: Console) -> None:
    for name, args in (("gptq", ["-f", "gptq", "-g", "64"]), ("gguf", ["--type", "Q4_K_M"])):
        if (work / name / "quantbench.json").is_file():
            continue
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "quantbench.cli", "convert", source, "-o",
                        str(work / name), *args], check=True, env=env, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        console.print(f"wrote {work / name} ({time.perf_counter() - start:.0f} s, not timed)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="sample:smollm2",
                    help="the model the inspected artifacts are converted from")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workdir", default=None, help="keep (and reuse) the artifacts here")
    ap.add_argument("--out", default="benchmarks/results/cli_startup.json")
    args = ap.parse_args()
    console = Console()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qb-startup-"))
    build_artifacts(args.source, work, env, console)
    sizes = {name: sum(f.stat().st_size for f in (work / name).iterdir())
             for name in ("gptq", "gguf")}
    runs = [("python (bare interpreter)", [sys.executable, "-c", "pass"], 0, False),
            ("python -c 'import torch'", [sys.executable, "-c", "import torch"], 0, False)]
    runs += [(label, [sys.executable, "-m", "quantbench.cli", *argv], code, True)
             for label, argv, code in commands(work)]
    rows = []
    for label, argv, code, quantbench in runs:
        times = [timed(argv, code, env) for _ in range(args.runs)]
        rows.append({"command": label, "argv": argv[1:] if quantbench else argv,
                     "exit_code": code, "median_s": round(statistics.median(times), 3),
                     "min_s": round(min(times), 3), "max_s": round(max(times), 3),
                     "quantbench": quantbench,
                     "under_target": statistics.median(times) < TARGET_S if quantbench else None})
    payload = {"benchmark": "cli_startup", "target_s": TARGET_S, "runs": args.runs,
               "source": args.source, "artifact_bytes": sizes, "rows": rows,
               "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version(),
                           "load_average": list(os.getloadavg())}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    table = Table(title=f"quantbench start-up: median of {args.runs} runs (target "
                        f"{TARGET_S} s); artifacts from {args.source}: GPTQ "
                        f"{sizes['gptq'] / 1e6:.0f} MB, GGUF {sizes['gguf'] / 1e6:.0f} MB")
    for col in ("command", "median s", "min s", "max s", "target"):
        table.add_column(col, justify="left" if col == "command" else "right")
    for r in rows:
        verdict = "" if r["under_target"] is None else "ok" if r["under_target"] else "SLOW"
        table.add_row(r["command"], f"{r['median_s']:.2f}", f"{r['min_s']:.2f}",
                      f"{r['max_s']:.2f}", verdict)
    console.print(table)
    console.print(f"load average {payload['machine']['load_average'][0]:.2f} on "
                  f"{os.cpu_count()} CPUs; wrote {args.out}")


if __name__ == "__main__":
    main()
