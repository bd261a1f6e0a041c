"""Every output byte of a matrix of conversions stays the same across refactors.

The matrix (benchmarks/output_hashes.py: every method × grid × format path, 4 × 128 calibration
tokens) runs on a tiny random llama wide enough for k-quant super-blocks; the sha256 of every
weight file written must equal the recorded one (tests/fixtures/output_hashes_tiny.json,
recorded on a known-good commit with one compute thread). A change of these bytes is a change
of behaviour: re-record only when it is intended, and say why in the commit.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

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


def run_tiny_matrix(tmp_path: Path) -> dict:
    module = _matrix_module()
    source = make_hash_model(tmp_path / "model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return module.run_matrix(source, tmp_path / "out")
    finally:
        torch.set_num_threads(threads)


def test_output_bytes_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))  # fresh EXL2 measurement
    got = run_tiny_matrix(tmp_path)
    expected = json.loads(EXPECTED.read_text())["hashes"]
    assert set(got) == set(expected)
    changed = {name: files for name, files in got.items() if files != expected[name]}
    assert not changed, f"output bytes changed for {sorted(changed)}"


if __name__ == "__main__":  # record: python -m tests.test_output_hashes
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        import os
        os.environ["QUANTBENCH_CACHE"] = str(Path(tmp) / "cache")
        hashes = run_tiny_matrix(Path(tmp))
    EXPECTED.write_text(json.dumps({"threads": 1, "hashes": hashes}, indent=1, sort_keys=True)
                        + "\n")
    print(f"recorded {sum(map(len, hashes.values()))} files of {len(hashes)} conversions")
