"""GGUF on the sample, ours against llama.cpp's own pipeline, all measured by llama.cpp.

    python benchmarks/bench_gguf.py [--model sample:smollm2] [--chunks 16]
        [--types Q8_0,Q4_0,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K]
        [--methods rtn,imatrix,gptq,awq+gptq@Q4_K_M+Q3_K_M]

Writes benchmarks/results/gguf_<model>.json (``--out`` to change it), e.g. gguf_smollm2.json,
gguf_gemma3-270m.json.

For each type: quantbench's ``convert --type`` with ``rtn`` (llama.cpp's reference search),
``imatrix``, ``gptq`` and ``awq+gptq`` (``--methods``), against llama.cpp's
``convert_hf_to_gguf.py`` + ``llama-quantize`` with and without ``llama-imatrix`` (fed the same
calibration windows as text). Every file is scored by ``llama-perplexity`` against the F16
file's saved logits (``--kl-divergence``): perplexity, mean / p99 KLD, top-1 agreement, on the
same tokens (second-half scoring, ctx 512). Wall time and peak RSS of every step come from
``wait4``. Writes JSON and prints a table.
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
from rich.table import Table

from quantbench.calibration.data import CalibrationSpec, sample_windows
from quantbench.eval.report import write_json
from quantbench.models.loader import load_model
from quantbench.runtimes import llamacpp

CALIB = ("--calib-samples", "16", "--calib-len", "512")


METHODS = {  # our GGUF methods by label: convert options
    "rtn": ["--method", "rtn"],
    "imatrix": ["--method", "imatrix", *CALIB],
    "gptq": ["--method", "gptq", *CALIB],
    "gptq-ft": ["--method", "gptq", "--float-targets", *CALIB],
    "gptq-weighted": ["--method", "gptq", "--router-weighted", *CALIB],  # MoE models
    "awq+gptq": ["--method", "awq", "--then", "gptq", "--act-order", *CALIB],
}


def convert_ours(source: str, gguf_type: str, method: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "quantbench.cli", "convert", source, *METHODS[method],
           "--type", gguf_type, "-o", str(out), "--overwrite"]
    return {**run_measured(cmd), "file": str(out / "model.gguf")}


def calibration_text(model, path: Path) -> int:
    """Our calibration windows (same seed and sizes as ``CALIB``) as plain text for llama-imatrix."""
    tok = model.tokenizer()
    windows = sample_windows(tok, CalibrationSpec(int(CALIB[1]), int(CALIB[3]), 0, None, False))
    # as text for llama-imatrix, which adds the BOS itself: the windows' own BOS is left out
    path.write_text("\n".join(tok.decode(w, skip_special_tokens=True) for w in windows))
    return len(windows)


def llama_pipeline(tools, model_dir: Path, work: Path, types: list[str], calib: Path) -> dict:
    conv = llamacpp.converter_dir()
    env = {"PYTHONPATH": os.pathsep.join([str(conv), str(conv / "gguf-py")])}
    f16 = work / "llama-f16.gguf"
    steps = {"convert_f16": run_measured([sys.executable, str(conv / "convert_hf_to_gguf.py"),
                                          str(model_dir), "--outtype", "f16", "--outfile",
                                          str(f16)], env=env)}
    imatrix = work / "llama.imatrix.gguf"
    steps["imatrix"] = run_measured([str(tools.tool("llama-imatrix")), "-m", str(f16), "-f",
                                     str(calib), "-c", CALIB[3], "-o", str(imatrix)],
                                    env={"LD_LIBRARY_PATH": str(tools.bin_dir)})
    files = {}
    for t in types:
        for label, extra in (("llama.cpp", []), ("llama.cpp imatrix", ["--imatrix", str(imatrix)])):
            out = work / f"{label.replace(' ', '-')}-{t}.gguf"
            m = run_measured([str(tools.tool("llama-quantize")), *extra, str(f16), str(out), t],
                             env={"LD_LIBRARY_PATH": str(tools.bin_dir)})
            files[(label, t)] = {**m, "file": str(out)}
    return {"f16": str(f16), "steps": steps, "files": files}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", "--source", dest="source", default="sample:smollm2")
    ap.add_argument("--types", default="Q8_0,Q4_0,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--out", default=None, help="default benchmarks/results/gguf_<model>.json")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--methods", default="rtn,imatrix,gptq,awq+gptq@Q4_K_M+Q3_K_M",
                    help=f"ours, of {', '.join(METHODS)}; NAME@T1+T2 runs NAME on those types only")
    args = ap.parse_args()
    types = args.types.split(",")
    tools = llamacpp.ensure()
    model = load_model(args.source)
    only: dict[str, set[str]] = {}
    for spec in args.methods.split(","):
        name, _, on = spec.partition("@")
        only[name] = set(on.split("+")) if on else set(types)
    ours_methods = list(only)
    unknown = set(ours_methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown --methods {', '.join(sorted(unknown))}; use {', '.join(METHODS)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-gguf-"))
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "calibration.txt"
    calibration_text(model, calib)
    llama = llama_pipeline(tools, model.path, work, types, calib)
    text = work / "wiki.test.raw"
    from quantbench.eval.data import load_eval_text

    text.write_text(load_eval_text(None).text)
    base = work / "f16.kld"
    f16 = llamacpp.perplexity(tools, Path(llama["f16"]), text, chunks=args.chunks, save_base=base)
    rows = []
    for t in types:
        candidates = {(m, t): convert_ours(args.source, t, m, work / f"ours-{m}-{t}")
                      for m in ours_methods if t in only[m]}
        candidates.update({k: v for k, v in llama["files"].items() if k[1] == t})
        for (who, _), info in candidates.items():
            r = llamacpp.perplexity(tools, Path(info["file"]), text, kld_base=base)
            size = Path(info["file"]).stat().st_size
            rows.append({"type": t, "who": who if who.startswith("llama") else f"quantbench {who}",
                         "size_mb": round(size / 1e6, 2),
                         "bpw": round(8 * size / model_params(model), 3),
                         "ppl": r.ppl, "kld_mean": r.kld_mean, "kld_p99": r.kld_p99,
                         "top1": r.top1, "seconds": info["seconds"],
                         "peak_rss_mb": info["peak_rss_mb"]})
    payload = {"source": args.source, "protocol": {"ctx": 512, "chunks": args.chunks,
                                                   "scoring": "llama-perplexity (second half)"},
               "f16_ppl": f16.ppl, "llama_cpp_steps": llama["steps"], "calibration": CALIB,
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
               "rows": rows}
    write_json(Path(args.out or f"benchmarks/results/gguf_{model_slug(args.source)}.json"),
               payload)
    show(payload)


def model_slug(source: str) -> str:
    """The model's short name for the result file: ``sample:NAME`` → NAME, a path → its name."""
    return source.split(":", 1)[1] if source.startswith("sample:") else Path(source).name


def model_params(model) -> int:
    total = 0
    for name in model.weights.names():
        n = 1
        for d in model.weights.shape(name):
            n *= d
        total += n
    return total


def show(payload: dict) -> None:
    table = Table(title=f"GGUF on {payload['source']}: llama-perplexity vs F16 "
                        f"(ppl {payload['f16_ppl']:.3f}), {payload['protocol']['chunks']} chunks")
    for col in ("type", "who", "size MB", "bpw", "ppl", "KLD mean", "KLD p99", "top-1 %",
                "convert s"):
        table.add_column(col, justify="left" if col in ("type", "who") else "right")
    for r in payload["rows"]:
        table.add_row(r["type"], r["who"], f"{r['size_mb']:.1f}", f"{r['bpw']:.3f}",
                      f"{r['ppl']:.3f}", f"{r['kld_mean']:.5f}", f"{r['kld_p99']:.4f}",
                      f"{100 * r['top1']:.2f}", f"{r['seconds']:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
