"""Real runtime: our ``gptq`` output loaded by transformers through GPTQModel's CPU kernel (in
the peer venv of benchmarks/peers/README.md, never a project dependency) gives the logits of
the model our reader builds."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantbench.api import quantize, save
from quantbench.formats.io import open_artifact
from quantbench.models.torch_model import build_causal_lm
from tests.conftest import PEER_GPTQMODEL as PEER, needs_gptqmodel

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "peers" / "transformers_logits.py"

pytestmark = [pytest.mark.slow, needs_gptqmodel]


@pytest.mark.parametrize("symmetric,act_order,static", [(True, True, False), (False, False, True),
                                                       (False, True, True)])
def test_transformers_with_gptqmodel_loads_our_gptq(tiny_llama, tmp_path, symmetric, act_order,
                                                    static):
    q = quantize(str(tiny_llama), method="gptq", bits=4, group_size=32, symmetric=symmetric,
                 act_order=act_order, static_groups=static, calib_samples=4, calib_len=32)
    out = save(q, tmp_path / "gptq", format="gptq")
    ids = torch.randint(2, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    proc = subprocess.run([str(PEER), str(SCRIPT), str(out), str(tmp_path / "ids.json"),
                           str(tmp_path / "logits.safetensors")], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    art = open_artifact(out)
    with torch.inference_mode():
        ours = build_causal_lm(art.config, art.dequantized(), torch.float32)(ids).logits
    assert (ours - theirs).abs().max() < 2e-2 * theirs.abs().max()  # their fp16 compute
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.95
