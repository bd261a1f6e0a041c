"""Real runtime: our ``awq`` (GEMM) output loaded on CPU by GPTQModel 7.6 and by transformers
5.x through GPTQModel's AWQ kernels, in the peer venv of benchmarks/peers/README.md (never a
project dependency). The runtime's dequantized weights are our reader's, bit for bit, and its
logits are our evaluator's up to its float16 (or, for the ATen kernel, bfloat16) arithmetic.

Tolerances, measured on 4 seeds of the tiny llama x (zeropoint, awq with k_proj excluded), 2x32
tokens, as max|ours - theirs| / max|ours| with ``ours`` = the evaluator's float32 logits:

* ``AwqTorchLinear`` (GPTQModel.load ``BACKEND.TORCH``; transformers ``backend="torch_awq"``;
  both give identical logits): 5.7e-4 .. 7.3e-4, i.e. under one float16 ulp of the largest
  logit, the same as running our own dequantized weights in float16 (5.7e-4 .. 7.5e-4).
  Bound 2e-3 (~3 ulps).
* ``TorchAtenAwqLinear`` (what transformers picks on CPU by default: ATen int4pack, bfloat16
  activations and scales, bfloat16 unit roundoff 3.9e-3): 2.9e-3 .. 5.4e-3. Bound 1.5e-2.

Quantization itself moves the logits by 8e-2 .. 1.5e-1 on the same scale, so both bounds still
catch a misread layout (interleave, zero offset, group order)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from quantbench.api import quantize, save
from quantbench.config import TargetConfig
from quantbench.eval.run import artifact_factory
from quantbench.formats.io import open_artifact
from tests.conftest import PEER_GPTQMODEL as PEER, needs_gptqmodel

PEERS = Path(__file__).resolve().parents[2] / "benchmarks" / "peers"
FP16_TOL = 2e-3   # AwqTorchLinear: float16 compute, measured <= 7.3e-4
BF16_TOL = 1.5e-2  # TorchAtenAwqLinear: bfloat16 compute and scales, measured <= 5.4e-3

pytestmark = [pytest.mark.slow, needs_gptqmodel]


@pytest.fixture(scope="module")
def awq_checkpoints(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """Plain zero-point RTN, and AWQ (scale search + clipping) with k_proj left unquantized
    (``modules_to_not_convert`` + GPTQModel ``dynamic``), both written as ``--format awq``."""
    root = tmp_path_factory.mktemp("awq-runtime")
    zp = quantize(str(tiny_llama), method="zeropoint", bits=4, group_size=32)
    awq = quantize(str(tiny_llama), method="awq", bits=4, group_size=32, calib_samples=4,
                   calib_len=32, targets=TargetConfig(exclude=("k_proj",)))
    ids = torch.randint(2, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    (root / "ids.json").write_text(json.dumps(ids.tolist()))
    return {"zeropoint": save(zp, root / "zeropoint", format="awq"),
            "awq": save(awq, root / "awq", format="awq"), "ids": root / "ids.json"}


def run_peer(*args: str) -> dict:
    proc = subprocess.run([str(PEER), *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "",
                               "GPTQMODEL_CPU_WORKERS": "2"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def evaluator_logits(out: Path, ids: torch.Tensor) -> tuple[object, torch.Tensor]:
    art = open_artifact(out)
    assert art.format == "awq"
    with torch.inference_mode():
        return art, artifact_factory(art)()(ids).float()


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, tol: float) -> None:
    err = float((ours - theirs).abs().max() / ours.abs().max())
    assert err < tol, f"max |ours - runtime| = {err:.2e} of max |logit| (bound {tol})"
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("variant", ["zeropoint", "awq"])
def test_gptqmodel_loads_our_awq(awq_checkpoints, tmp_path, variant):
    out, ids_json = awq_checkpoints[variant], awq_checkpoints["ids"]
    ref = tmp_path / "gptqmodel.safetensors"
    summary = run_peer(str(PEERS / "gptqmodel_dequantize.py"), "--model", str(out),
                       "--ids", str(ids_json), "--weight-dtype", "float16", "--out", str(ref))
    assert summary["format"] == "awq" and summary["kernels"] == "AwqTorchLinear"
    theirs = load_file(str(ref))
    art, ours = evaluator_logits(out, theirs["__ids__"])
    names = sorted(k for k in theirs if not k.startswith("__"))
    assert names == sorted(art.quantized_names)  # excluded k_proj stayed plain in GPTQModel too
    for name in names:  # what AwqTorchLinear multiplies by, vs our reader rounded to its fp16
        assert torch.equal(theirs[name], art.quantized(name).dequantize(torch.float16)), name
    assert_close(ours, theirs["__logits__"], FP16_TOL)


@pytest.mark.parametrize("backend,kernel,tol", [("torch_awq", "AwqTorchLinear", FP16_TOL),
                                                ("auto", "TorchAtenAwqLinear", BF16_TOL)])
def test_transformers_loads_our_awq(awq_checkpoints, tmp_path, backend, kernel, tol):
    out, ids_json = awq_checkpoints["awq"], awq_checkpoints["ids"]
    dump = tmp_path / "logits.safetensors"
    summary = run_peer(str(PEERS / "transformers_logits.py"), str(out), str(ids_json),
                       str(dump), backend)
    assert summary["kernels"] == [kernel]
    with safe_open(str(dump), "pt") as fh:
        quantized = fh.metadata()["quantized"].split(",")
    art, ours = evaluator_logits(out, torch.tensor(json.loads(ids_json.read_text())))
    assert sorted(f"{m}.weight" for m in quantized) == sorted(art.quantized_names)
    assert_close(ours, load_file(str(dump))["logits"], tol)
