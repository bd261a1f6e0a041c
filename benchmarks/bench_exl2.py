"""EXL2 on the sample model: bpw targets from one measurement, against uniform 4-bit GPTQ g64.

    python benchmarks/bench_exl2.py [--targets 2.5,3.0,3.5,4.0,4.65,5.0,6.0] [--calib-samples 32]
        [--gguf-types Q3_K_M,Q4_K_M,Q5_K_M] [--workdir DIR]

The first ``quantbench convert --method exl2 --bpw T`` measures every block branch × candidate
into one measurement file; every other target reuses it (its measuring time is reported on
its own line). Each conversion runs in its own process (wall time, peak RSS); every artifact
is then read back through its format's reader and evaluated in one lock-step pass against the
FP16 baseline on the same tokens. Writes JSON (with each target's achieved bpw and predicted
error), prints a table, and plots bits per weight of the transformer blocks' linear layers
against KLD: the EXL2 curve, this run's uniform GPTQ g64 and GGUF points (GGUF files made by
quantbench, read back by our GGUF reader, scored in the same pass), and the uniform RTN / GPTQ /
AWQ points of ``rtn_smollm2.json`` and ``calibrated_smollm2.json`` where their protocol is ours.
With ``--workdir`` the artifacts and the measurement are kept, and a rerun reuses the measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

from _measure import run_measured
from rich.console import Console

from quantbench.eval.evaluator import evaluate
from quantbench.eval.protocol import EvalProtocol
from quantbench.eval.report import ReportRow, plot_curves, render_table, write_json
from quantbench.eval.run import artifact_factory, eval_cache_dir, source_factory
from quantbench.formats.io import open_artifact
from quantbench.models.loader import load_model


def convert(source: str, out: Path, args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "quantbench.cli", "convert", source, "-o", str(out),
           "--overwrite", *args]
    return run_measured(cmd, digits=2)


BLOCK_TENSOR = re.compile(r"(?:^|\.)layers\.\d+\.")
REFERENCES = ("rtn_smollm2.json", "calibrated_smollm2.json")


def block_bpw(manifest: dict) -> float:
    """Bits per weight over the transformer blocks' 2-D weights: the part every format here
    quantizes (GGUF also quantizes the embedding; EXL2 and GPTQ keep it in float16)."""
    rows = [t for name, t in manifest["tensors"].items()
            if BLOCK_TENSOR.search(name) and len(t["shape"]) == 2]
    n = sum(t["shape"][0] * t["shape"][1] for t in rows)
    return round(sum(t["shape"][0] * t["shape"][1] * t["bits_per_weight"] for t in rows) / n, 4)


def reference_series(protocol: dict, results: Path, console: Console) -> dict[str, list]:
    """Uniform-method points measured earlier under the same protocol, by family. GPTQ's
    points come from ``gptq_scale_search_smollm2.json`` (the current GPTQ, scale search on):
    the GPTQ rows of ``calibrated_smollm2.json`` predate it."""
    series: dict[str, list] = {}

    def add(family: str, point: tuple) -> None:
        points = series.setdefault(family, [])
        if point not in points:  # RTN rows repeat in two files
            points.append(point)

    for name in REFERENCES:
        path = results / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        if data.get("protocol") != protocol:
            console.print(f"[yellow]{name}: another protocol ({data.get('protocol_text')}); "
                          "its points are left out of the plot[/]")
            continue
        for r in data["results"]:
            if r["method"] == "gptq":
                continue
            group = "channel" if r["group_size"] == -1 else f"g{r['group_size']}"
            add(f"{r['method']} {group} (uniform)", (r["bits_per_weight"], r["kld_mean"],
                                                     f"w{r['bits']}"))
    path = results / "gptq_scale_search_smollm2.json"
    if path.is_file():
        report = json.loads(path.read_text())["report"]
        if report["protocol"] == protocol:
            for key, r in report["results"].items():
                bits = int(key[1:])  # zero-point g64: fp16 scale + `bits`-bit zero per 64
                add("gptq g64 zero-point (uniform)", (bits + (16 + bits) / 64, r["kld_mean"],
                                                      key))
    return series


def plot(payload: dict, out: Path, console: Console) -> None:
    """The size-vs-KLD curves of a results file (``--replot`` redraws them from it)."""
    series: dict[str, list] = {}
    for r in payload["results"]:
        if r["method"] == "exl2":
            family, label = "EXL2 (measured mix)", f"{r['target_bpw']}"
        elif r["method"] == "gptq":
            family, label = "GPTQ g64 symmetric (this run)", "w4"
        else:  # gguf-<TYPE>-<method>
            _, gguf_type, how = r["name"].split("-", 2)
            family, label = f"GGUF {how} (quantbench, this run)", gguf_type
        series.setdefault(family, []).append((r["block_bpw"], r["kld_mean"], label))
    series.update(reference_series(payload["protocol"], out.parent, console))
    plot_curves(series, out.with_suffix(".png"),
                f"{payload['source']}: EXL2 targets against uniform methods — "
                f"{payload['protocol_text']}", "bits per weight, transformer blocks' linear layers")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="sample:smollm2")
    ap.add_argument("--targets", default="2.5,3.0,3.5,4.0,4.65,5.0,6.0")
    ap.add_argument("--gguf-types", default="Q3_K_M,Q4_K_M,Q5_K_M",
                    help="GGUF mixtures made with --gguf-method, for the plot ('' for none)")
    ap.add_argument("--gguf-method", default="imatrix")
    ap.add_argument("--calib-samples", default="32")
    ap.add_argument("--measure-samples", default="16")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--out", default="benchmarks/results/exl2_smollm2.json")
    ap.add_argument("--workdir", default=None, help="keep artifacts and the measurement here")
    ap.add_argument("--replot", action="store_true", help="only redraw the plot of --out")
    args = ap.parse_args()
    console = Console()
    if args.replot:
        plot(json.loads(Path(args.out).read_text()), Path(args.out), console)
        return
    model = load_model(args.source)
    protocol = EvalProtocol(ctx=args.ctx, max_tokens=args.max_tokens)
    calib = ["--calib-samples", args.calib_samples]
    with tempfile.TemporaryDirectory(prefix="qb-bench-exl2-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        measurement = work / "measurement.json"
        runs: dict[str, dict] = {}
        jobs = [("gptq-w4-g64", "gptq", ["--method", "gptq", "--bits", "4", "--group-size", "64",
                                          "--format", "gptq", *calib])]
        jobs += [(f"exl2-{t}bpw", "exl2", ["--method", "exl2", "--bpw", t, "--format", "exl2",
                                           "--measurement", str(measurement),
                                           "--measure-samples", args.measure_samples, *calib])
                 for t in args.targets.split(",")]
        jobs += [(f"gguf-{t}-{args.gguf_method}", "gguf",
                  ["--method", args.gguf_method, "--type", t,
                   *(calib if args.gguf_method != "rtn" else [])])
                 for t in args.gguf_types.split(",") if t]
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
            run["block_bpw"] = block_bpw(art.manifest)
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
    plot(payload, Path(args.out), console)
    console.print(render_table(rows, f"EXL2 targets on {args.source}", report.describe()))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
