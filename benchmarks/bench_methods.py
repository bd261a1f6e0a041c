"""Methods on the sample model: quantize+write time, peak RSS, size, ppl, KLD → JSON + table.

    python benchmarks/bench_methods.py [--suite rtn|calibrated|bnb] [--source sample:smollm2]

Each conversion runs in its own process (``quantbench convert``) so its wall time and peak RSS
are its own; all artifacts are then read back through their format's reader and evaluated in
one lock-step pass against the FP16 baseline on the same tokens.
"""
from __future__ import annotations

import argparse
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

SUITES = {  # (method, bits, group size, extra CLI options); -1 = per output channel
    "rtn": [
        ("absmax", 8, -1, ()),
        ("zeropoint", 8, -1, ()),
        ("absmax", 4, 64, ()),
        ("zeropoint", 4, 64, ()),
        ("zeropoint", 4, 32, ()),  # the Q4_1 group of the sample: flatters it (see README)
        ("absmax", 3, 64, ()),
        ("zeropoint", 3, 64, ()),
    ],
    # compressed-tensors 0.20 loads act-order only with static groups (actorder "weight");
    # every calibrated method sees the same 32 x 512 C4 windows (seed 0)
    "calibrated": [
        ("zeropoint", 4, 64, ()),
        ("gptq", 4, 64, ("--zero-point", "--static-groups", "--calib-samples", "32")),
        ("awq", 4, 64, ("--calib-samples", "32")),
        ("zeropoint", 3, 64, ()),
        ("gptq", 3, 64, ("--zero-point", "--static-groups", "--calib-samples", "32")),
        ("awq", 3, 64, ("--calib-samples", "32")),
    ],
    # GPTQ on integer grids with v_proj on the attention-weighted Hessians per kv head
    # (--attention-values, opt-in there) against the plain input Hessian, at 4 and 3 bits
    "attention": [
        ("gptq", 4, 64, ("--zero-point", "--static-groups", "--calib-samples", "32")),
        ("gptq", 4, 64, ("--zero-point", "--static-groups", "--calib-samples", "32",
                         "--attention-values")),
        ("gptq", 3, 64, ("--zero-point", "--static-groups", "--calib-samples", "32")),
        ("gptq", 3, 64, ("--zero-point", "--static-groups", "--calib-samples", "32",
                         "--attention-values")),
    ],
    # the bitsandbytes family in its own layout (read back as transformers + bitsandbytes run
    # it: LLM.int8 with its outlier decomposition), next to integer RTN and GPTQ near the
    # same bits per weight; NF4 has no 3-bit form (3-bit results: the calibrated suite)
    "bnb": [
        ("llm_int8", 8, -1, ("--calib-samples", "16"), "bitsandbytes"),
        ("zeropoint", 8, -1, ()),
        ("nf4", 4, 64, (), "bitsandbytes"),
        ("nf4", 4, 64, ("--double-quant",), "bitsandbytes"),
        ("fp4", 4, 64, (), "bitsandbytes"),
        ("zeropoint", 4, 64, ()),
        ("gptq", 4, 64, ("--zero-point", "--static-groups", "--calib-samples", "32")),
    ],
}


def convert(source: str, method: str, bits: int, group: int, fmt: str, out: Path,
            extra: tuple[str, ...] = ()) -> dict:
    """Run one conversion in a child process; return its wall time and peak RSS."""
    cmd = [sys.executable, "-m", "quantbench.cli", "convert", source, "--method", method,
           "--bits", str(bits), "--group-size", str(group), "--format", fmt, "-o", str(out),
           "--overwrite", *extra]
    return run_measured(cmd, digits=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=sorted(SUITES), default="rtn")
    ap.add_argument("--source", default="sample:smollm2")
    ap.add_argument("--format", default="compressed-tensors")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--out", default=None,
                    help="JSON path (benchmarks/results/SUITE_<model>.json, e.g. "
                         "calibrated_smollm2.json, calibrated_gemma3-270m.json)")
    args = ap.parse_args()
    slug = args.source.split(":", 1)[1] if args.source.startswith("sample:") else \
        Path(args.source).name
    args.out = args.out or f"benchmarks/results/{args.suite}_{slug}.json"
    console = Console()
    model = load_model(args.source)
    protocol = EvalProtocol(ctx=args.ctx, max_tokens=args.max_tokens)
    with tempfile.TemporaryDirectory(prefix="qb-bench-") as tmp:
        runs = {}
        for method, bits, group, extra, *fmt in SUITES[args.suite]:
            name = f"{method}-w{bits}-g{'ch' if group == -1 else group}" + (
                "-dq" if "--double-quant" in extra else "") + (
                "-attn" if "--attention-values" in extra else "")
            fmt = fmt[0] if fmt else args.format
            console.print(f"converting {name} → {fmt} …")
            runs[name] = {"method": method, "bits": bits, "group_size": group,
                          "path": Path(tmp) / name, "format": fmt,
                          "options": list(extra),
                          **convert(args.source, method, bits, group, fmt,
                                    Path(tmp) / name, extra)}
        arts = {name: open_artifact(run["path"]) for name, run in runs.items()}
        report = evaluate(source_factory(model), {n: artifact_factory(a) for n, a in arts.items()},
                          model.tokenizer(), protocol, baseline_key=model.fingerprint(),
                          cache_dir=eval_cache_dir(), progress=True)
        rows = []
        for name, run in runs.items():
            res, art = report.results[name], arts[name]
            summary = art.manifest["summary"]
            rows.append(ReportRow(name=name, method=run["method"], bits=run["bits"],
                                  group_size=run["group_size"],
                                  bits_per_weight=summary["bits_per_weight_quantized"],
                                  size_bytes=art.size_bytes(), ppl=res.ppl,
                                  delta_ppl_pct=res.delta_ppl_pct, kld_mean=res.kld_mean,
                                  kld_p99=res.kld_p99, top1=res.top1, seconds=run["seconds"]))
            run["path"] = None
    payload = {
        "benchmark": args.suite, "source": args.source, "format": args.format,
        "protocol": protocol.to_dict(), "protocol_text": report.describe(),
        "baseline": {"ppl": report.baseline.ppl, "n_tokens": report.baseline.n_tokens},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "results": [{**row.__dict__, **{k: runs[row.name][k]
                                        for k in ("peak_rss_mb", "options", "format")}}
                    for row in rows],
    }
    write_json(Path(args.out), payload)
    plot_size_vs_quality(rows, Path(args.out).with_suffix(".png"), f"{args.suite} on {args.source}")
    console.print(render_table(rows, f"{args.suite} on {args.source} ({args.format})",
                               report.describe()))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
