"""GPTQ side by side: quantbench vs GPTQModel on the same model, grid, windows and seed.

    python benchmarks/bench_peers.py [--bits 4 3] [--peer-python /work/peers/gptqmodel/bin/python]

Both tools get the same ``N × L`` calibration windows (quantbench's seeded C4 sample, handed to
GPTQModel as token ids), bits, group size, act-order with static groups, zero-point and 1 %
dampening. Each conversion runs alone in a child process (wall time and peak RSS from
``wait4``); GPTQModel runs in its own venv (see ``benchmarks/peers/README.md``) in float32, its
fastest dtype on a CPU without bf16 units. Both checkpoints are then read back through
quantbench's ``gptq`` reader (which reproduces GPTQModel's own dequantization exactly, see
``tests/formats/test_gptqmodel_checkpoints.py``) and evaluated in one lock-step pass.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from _measure import run_measured
from rich.console import Console
from rich.table import Table

from quantbench.calibration.data import CalibrationSpec, sample_windows
from quantbench.eval.evaluator import evaluate
from quantbench.eval.protocol import EvalProtocol
from quantbench.eval.run import artifact_factory, eval_cache_dir, source_factory
from quantbench.formats.io import open_artifact
from quantbench.models.loader import load_model

PEER_SCRIPT = Path(__file__).parent / "peers" / "gptqmodel_quantize.py"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="sample:smollm2")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--peer-python", default="/work/peers/gptqmodel/bin/python")
    ap.add_argument("--peer-dtype", default="float32")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--out", default="benchmarks/results/peers_gptqmodel.json")
    args = ap.parse_args()
    console = Console()
    if not Path(args.peer_python).is_file():
        raise SystemExit(f"no peer venv at {args.peer_python}; see benchmarks/peers/README.md")
    model = load_model(args.source)
    spec = CalibrationSpec(args.calib_samples, args.calib_len, 0)
    windows = sample_windows(model.tokenizer(), spec)
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="qb-peers-") as tmp:
        wfile = Path(tmp) / "windows.json"
        wfile.write_text(json.dumps(windows.tolist()))
        for bits in args.bits:
            ours = Path(tmp) / f"quantbench-w{bits}"
            console.print(f"quantbench gptq w{bits} …")
            runs[ours.name] = {"tool": "quantbench", "bits": bits, "path": ours, **run_measured([
                sys.executable, "-m", "quantbench.cli", "convert", args.source, "--method", "gptq",
                "--bits", str(bits), "--group-size", str(args.group_size), "--zero-point",
                "--act-order", "--static-groups", "--damp", "0.01",
                "--calib-samples", str(args.calib_samples), "--calib-len", str(args.calib_len),
                "--seed", "0", "--format", "gptq", "-o", str(ours)])}
            theirs = Path(tmp) / f"gptqmodel-w{bits}"
            console.print(f"GPTQModel gptq w{bits} …")
            runs[theirs.name] = {"tool": "gptqmodel 7.6.0", "bits": bits, "path": theirs,
                                 **run_measured([
                args.peer_python, str(PEER_SCRIPT), "--model", str(model.path),
                "--windows", str(wfile), "--bits", str(bits), "--group-size",
                str(args.group_size), "--desc-act", "--asym", "--static-groups", "--damp", "0.01",
                "--dtype", args.peer_dtype, "--format", "gptq", "--out", str(theirs)],
                env={"GPTQMODEL_CPU_WORKERS": "2"})}
        arts = {name: open_artifact(run["path"]) for name, run in runs.items()}
        protocol = EvalProtocol(ctx=512, max_tokens=args.max_tokens)
        report = evaluate(source_factory(model), {n: artifact_factory(a) for n, a in arts.items()},
                          model.tokenizer(), protocol, baseline_key=model.fingerprint(),
                          cache_dir=eval_cache_dir(), progress=True)
        rows = []
        for name, run in runs.items():
            res = report.results[name]
            rows.append({"name": name, "tool": run["tool"], "bits": run["bits"],
                         "group_size": args.group_size, "format": arts[name].format,
                         "size_bytes": arts[name].size_bytes(), "ppl": res.ppl,
                         "delta_ppl_pct": res.delta_ppl_pct, "kld_mean": res.kld_mean,
                         "kld_p99": res.kld_p99, "top1": res.top1, "seconds": run["seconds"],
                         "peak_rss_mb": run["peak_rss_mb"]})
    payload = {"benchmark": "gptq side by side", "source": args.source,
               "settings": {"group_size": args.group_size, "act_order": True,
                            "static_groups": True, "symmetric": False, "damp": 0.01,
                            "calibration": f"{args.calib_samples} x {args.calib_len} bundled C4, "
                                           "seed 0, identical token ids",
                            "gptqmodel_dtype": args.peer_dtype, "GPTQMODEL_CPU_WORKERS": 2},
               "protocol": protocol.to_dict(), "protocol_text": report.describe(),
               "baseline": {"ppl": report.baseline.ppl, "n_tokens": report.baseline.n_tokens},
               "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
               "results": rows}
    Path(args.out).write_text(json.dumps(payload, indent=2))
    table = Table(title=f"GPTQ w/ act-order, static groups, g{args.group_size}: "
                        f"quantbench vs GPTQModel ({report.describe()})")
    for col in ("tool", "bits", "ppl", "Δppl %", "KLD", "top-1 %", "time (s)", "peak RSS (MB)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["tool"], str(r["bits"]), f"{r['ppl']:.3f}", f"{r['delta_ppl_pct']:+.2f}",
                      f"{r['kld_mean']:.4f}", f"{100 * r['top1']:.2f}", f"{r['seconds']:.0f}",
                      f"{r['peak_rss_mb']:.0f}")
    console.print(table)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
