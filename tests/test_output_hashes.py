"""Every output byte of a matrix of conversions stays the same across refactors.

The matrix (benchmarks/output_hashes.py: every method × grid × format path, 4 × 128 calibration
tokens) runs on a tiny random llama wide enough for k-quant super-blocks; the sha256 of every
weight file written must equal the recorded one (tests/fixtures/output_hashes_tiny.json,
recorded on a known-good commit). A change of these bytes is a change of behaviour: re-record
only when it is intended (``python -m tests.test_output_hashes``), and say why in the commit.

The bytes of calibrated methods depend on float summation order, which BLAS picks by CPU: the
matrix runs in a subprocess with one thread and every numeric library held to its portable
code path (:data:`PORTABLE`: MKL's conditional-numerical-reproducibility mode, ATen's
unvectorised kernels, OpenBLAS's SSE3 core), so the record holds on any x86-64 machine — the
AVX2 machine it was first recorded on and the AVX-512 one that showed the dependence differ
otherwise.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = Path(__file__).parent / "fixtures" / "output_hashes_tiny.json"


def _matrix_module():
    spec = importlib.util.spec_from_file_location("output_hashes",
                                                  ROOT / "benchmarks" / "output_hashes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_hash_model(directory: Path) -> Path:
    """Rows of 256 (k-quant super-blocks), two blocks, seed 0."""
    return make_tiny_llama(directory, layers=2, hidden=256, intermediate=512, seed=0)


PORTABLE = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default",
            "OPENBLAS_CORETYPE": "Prescott", "ONEDNN_MAX_CPU_ISA": "SSE41",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def run_tiny_matrix(tmp_path: Path) -> dict:
    """The matrix's hashes, computed in a subprocess on the portable code paths."""
    out = tmp_path / "hashes.json"
    proc = subprocess.run([sys.executable, "-m", "tests.test_output_hashes", "--json", str(out),
                           "--work", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **PORTABLE, "QUANTBENCH_CACHE":
                               str(tmp_path / "cache")})  # a fresh EXL2 measurement
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _compute(work: Path) -> dict:
    import torch

    assert torch.backends.cpu.get_cpu_capability() == "DEFAULT", "run with PORTABLE's env"
    torch.set_num_threads(1)
    return _matrix_module().run_matrix(make_hash_model(work / "model"), work / "out")


def test_output_bytes_unchanged(tmp_path):
    got = run_tiny_matrix(tmp_path)
    expected = json.loads(EXPECTED.read_text())["hashes"]
    assert set(got) == set(expected)
    changed = {name: files for name, files in got.items() if files != expected[name]}
    assert not changed, f"output bytes changed for {sorted(changed)}"


if __name__ == "__main__":
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description="record (no --json) or compute the hashes")
    ap.add_argument("--json", help="write the hashes here (the test's subprocess)")
    ap.add_argument("--work")
    args = ap.parse_args()
    if args.json:
        Path(args.json).write_text(json.dumps(_compute(Path(args.work))))
    else:  # record: python -m tests.test_output_hashes
        with tempfile.TemporaryDirectory() as tmp:
            hashes = run_tiny_matrix(Path(tmp))
        EXPECTED.write_text(json.dumps({"threads": 1, "env": PORTABLE, "hashes": hashes},
                                       indent=1, sort_keys=True) + "\n")
        print(f"recorded {sum(map(len, hashes.values()))} files of {len(hashes)} conversions")
