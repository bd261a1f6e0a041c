"""Output bytes of a matrix of conversions, as sha256 of every weight file written.

A refactor of the middle layer must leave every byte the same: record the hashes on a known-good
commit (``--record``), then check them after the change (``--check``). The matrix covers every
method × grid × format path (RTN, GGUF RTN/imatrix/GPTQ/AWQ, NF4 double-quant, LLM.int8, GPTQ on
integer grids with and without zero-points and attention-weighted values, AWQ with RTN and GPTQ,
EXL2 at a bpw target) with a small calibration (4 × 128 tokens).

    python benchmarks/output_hashes.py --source sample:smollm2 \
        --check benchmarks/results/output_hashes_smollm2.json

The same matrix on a tiny random llama runs in the test suite (tests/test_output_hashes.py).
Hashes depend on the float summation order, so a record is checked with the thread count it
was recorded with (stored in the JSON).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CALIB = {"calib_samples": 4, "calib_len": 128}

# name -> (method, quantize keywords, format)
MATRIX: dict[str, tuple[str, dict[str, Any], str]] = {
    "zeropoint-w4g64-ct": ("zeropoint", {"bits": 4, "group_size": 64}, "compressed-tensors"),
    "absmax-w8-dense": ("absmax", {"bits": 8, "group_size": -1}, "dense"),
    "rtn-Q4_K_M-gguf": ("rtn", {"gguf_type": "Q4_K_M"}, "gguf"),
    "rtn-Q3_K_S-gguf": ("rtn", {"gguf_type": "Q3_K_S"}, "gguf"),
    "imatrix-Q4_0-gguf": ("imatrix", {"gguf_type": "Q4_0", **CALIB}, "gguf"),
    "nf4-dq-bnb": ("nf4", {"double_quant": True}, "bitsandbytes"),
    "llm_int8-bnb": ("llm_int8", {**CALIB}, "bitsandbytes"),
    "gptq-w4g64-gptq": ("gptq", {"bits": 4, "group_size": 64, **CALIB}, "gptq"),
    "gptq-w3g64zp-ct": ("gptq", {"bits": 3, "group_size": 64, "symmetric": False, **CALIB},
                        "compressed-tensors"),
    "gptq-w4g64zp-attnvalues-ct": ("gptq", {"bits": 4, "group_size": 64, "symmetric": False,
                                            "attention_values": True, **CALIB},
                                   "compressed-tensors"),
    "gptq-Q4_K_M-gguf": ("gptq", {"gguf_type": "Q4_K_M", **CALIB}, "gguf"),
    "awq-w4g64-awq": ("awq", {"bits": 4, "group_size": 64, **CALIB}, "awq"),
    "awq-then-gptq-w4g64-gptq": ("awq", {"bits": 4, "group_size": 64, "then": "gptq",
                                         "act_order": True, **CALIB}, "gptq"),
    "awq-Q4_K_M-gguf": ("awq", {"gguf_type": "Q4_K_M", **CALIB}, "gguf"),
    "exl2-4.0bpw": ("exl2", {"bpw": 4.0, "measure_samples": 4, **CALIB}, "exl2"),
}

WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every weight file under ``directory`` (relative path → hex digest)."""
    out = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name.endswith(WEIGHT_SUFFIXES):
            out[str(path.relative_to(directory))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_matrix(source: Any, workdir: Path, names: list[str] | None = None,
               on_done=None) -> dict[str, dict[str, str]]:
    """Quantize and write every conversion of the matrix (or ``names``); their hashes."""
    import quantbench as qb

    model = qb.load_model(source) if isinstance(source, (str, Path)) else source
    results = {}
    for name in names or list(MATRIX):
        method, kwargs, fmt = MATRIX[name]
        start = time.perf_counter()
        q = qb.quantize(model, method=method, **kwargs)
        out = qb.save(q, workdir / name, format=fmt)
        results[name] = file_hashes(out)
        if on_done is not None:
            on_done(name, time.perf_counter() - start)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="sample:smollm2")
    parser.add_argument("--threads", type=int, default=None,
                        help="compute threads (default: the record's, else 2)")
    parser.add_argument("--only", default=None, help="comma-separated matrix names")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", type=Path, help="write the hashes to this JSON")
    mode.add_argument("--check", type=Path, help="compare against this JSON; exit 1 on change")
    args = parser.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    expected = json.loads(args.check.read_text()) if args.check else None
    threads = args.threads or (expected or {}).get("threads") or 2
    torch.set_num_threads(threads)
    names = args.only.split(",") if args.only else None
    console = Console()
    with tempfile.TemporaryDirectory(prefix="qb-hashes-") as tmp:
        got = run_matrix(args.source, Path(tmp), names,
                         on_done=lambda n, s: console.print(f"{n}: {s:.1f} s"))
    table = Table(title=f"output hashes of {args.source} ({threads} threads)")
    for col in ("conversion", "file", "sha256", "status"):
        table.add_column(col)
    changed = 0
    for name, files in got.items():
        want = (expected or {}).get("hashes", {}).get(name, {})
        for file, digest in files.items():
            status = "recorded" if expected is None else \
                ("same" if want.get(file) == digest else "CHANGED")
            changed += status == "CHANGED"
            table.add_row(name, file, digest[:16], status)
        if expected is not None and set(want) != set(files):
            changed += 1
            table.add_row(name, "(file set)", ", ".join(sorted(set(want) ^ set(files))), "CHANGED")
    console.print(table)
    if args.record:
        from quantbench.formats.manifest import write_json_atomic

        write_json_atomic(args.record, {"source": str(args.source), "threads": threads,
                                        "calibration": CALIB, "hashes": got})
        return 0
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
