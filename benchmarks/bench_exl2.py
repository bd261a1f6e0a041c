"""EXL2 on the sample model: bpw targets from one measurement, against uniform 4-bit GPTQ g64.

    python benchmarks/bench_exl2.py [--targets 2.5,3.0,3.5,4.0,4.5,5.0,6.0] [--calib-samples 32]

The first ``quantbench convert --method exl2 --bpw T`` measures every block branch × candidate
into one measurement file; every other target reuses it (its measuring time is reported on
its own line). Each conversion runs in its own process (wall time, peak RSS); every artifact
is then read back through its format's reader and evaluated in one lock-step pass against the
FP16 baseline on the same tokens. Writes JSON (with each target's achieved bpw and predicted
error) and prints a table.
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

from quantbench.eval.evaluator import evaluate
from quantbench.eval.protocol import EvalProtocol
from quantbench.eval.report import ReportRow, plot_size_vs_quality, render_table, write_json
from quantbench.eval.run import artifact_factory, eval_cache_dir, source_factory
from quantbench.formats.io import open_artifact
from quantbench.models.loader import load_model


def convert(source: str, out: Path, args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "quantbench.cli", "convert", source, "-o", str(out),
           "--overwrite", *args]
    return run_measured(cmd, digits=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="sample:smollm2")
    ap.add_argument("--targets", default="2.5,3.0,3.5,4.0,4.5,5.0,6.0")
    ap.add_argument("--calib-samples", default="32")
    ap.add_argument("--measure-samples", default="16")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--out", default="benchmarks/results/exl2_smollm2.json")
    args = ap.parse_args()
    console = Console()
    model = load_model(args.source)
    protocol = EvalProtocol(ctx=args.ctx, max_tokens=args.max_tokens)
    calib = ["--calib-samples", args.calib_samples]
    with tempfile.TemporaryDirectory(prefix="qb-bench-exl2-") as tmp:
        work = Path(tmp)
        measurement = work / "measurement.json"
        runs: dict[str, dict] = {}
        jobs = [("gptq-w4-g64", "gptq", ["--method", "gptq", "--bits", "4", "--group-size", "64",
                                          "--format", "gptq", *calib])]
        jobs += [(f"exl2-{t}bpw", "exl2", ["--method", "exl2", "--bpw", t, "--format", "exl2",
                                           "--measurement", str(measurement),
                                           "--measure-samples", args.measure_samples, *calib])
                 for t in args.targets.split(",")]
        for name, method, cli in jobs:
            console.print(f"converting {name} …")
            fresh = method == "exl2" and not measurement.is_file()
            runs[name] = {"method": method, "options": cli, "path": work / name,
                          "measured_here": fresh, **convert(args.source, work / name, cli)}
            strategy = work / name / "exl2_strategy.json"
            if strategy.is_file():
                s = json.loads(strategy.read_text())
                runs[name].update(target_bpw=s["target_bpw"], achieved_bpw=s["achieved_bpw"],
                                  predicted_error=s["predicted_error"])
        arts = {name: open_artifact(run["path"]) for name, run in runs.items()}
        report = evaluate(source_factory(model), {n: artifact_factory(a) for n, a in arts.items()},
                          model.tokenizer(), protocol, baseline_key=model.fingerprint(),
                          cache_dir=eval_cache_dir(), progress=True)
        rows = []
        for name, run in runs.items():
            res, art = report.results[name], arts[name]
            rows.append(ReportRow(
                name=name, method=run["method"], bits=4 if run["method"] == "gptq" else None,
                group_size=64 if run["method"] == "gptq" else None,
                bits_per_weight=art.manifest["summary"]["bits_per_weight_quantized"],
                size_bytes=art.size_bytes(), ppl=res.ppl, delta_ppl_pct=res.delta_ppl_pct,
                kld_mean=res.kld_mean, kld_p99=res.kld_p99, top1=res.top1,
                seconds=run["seconds"]))
            run["path"] = None
    payload = {
        "benchmark": "exl2", "source": args.source, "protocol": protocol.to_dict(),
        "protocol_text": report.describe(),
        "baseline": {"ppl": report.baseline.ppl, "n_tokens": report.baseline.n_tokens},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "results": [{**row.__dict__, **{k: v for k, v in runs[row.name].items() if k != "path"}}
                    for row in rows],
    }
    write_json(Path(args.out), payload)
    plot_size_vs_quality(rows, Path(args.out).with_suffix(".png"), f"EXL2 on {args.source}")
    console.print(render_table(rows, f"EXL2 targets on {args.source}", report.describe()))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
