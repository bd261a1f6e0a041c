import json

import pytest
import torch

from quantbench.api import evaluate, quantize, save
from quantbench.errors import ConfigError
from quantbench.formats.io import open_artifact
from quantbench.models.torch_model import build_causal_lm

CALIB = dict(calib_samples=16, calib_len=64)


def test_gptq_beats_rtn_on_tiny_model(tiny_llama, tmp_path):
    kld = {}
    for method, kwargs in (("zeropoint", {}), ("gptq", CALIB)):
        q = quantize(str(tiny_llama), method=method, bits=3, group_size=32, symmetric=False,
                     **kwargs)
        out = save(q, tmp_path / method, format="dense")
        kld[method] = evaluate(out, ctx=64, max_tokens=1024, use_cache=False
                               ).results[method].kld_mean
    assert kld["gptq"] < 0.9 * kld["zeropoint"]
    manifest = json.loads((tmp_path / "gptq" / "quantbench.json").read_text())
    assert manifest["quantize"]["options"]["calib_samples"] == 16


def test_gptq_compressed_tensors_static_groups_loads_in_transformers(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    q = quantize(str(tiny_llama), method="gptq", bits=4, group_size=32, static_groups=True,
                 **CALIB)
    out = save(q, tmp_path / "ct", format="compressed-tensors")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["config_groups"]["group_0"]["weights"]["actorder"] == "weight"
    art = open_artifact(out)
    ours = build_causal_lm(art.config, art.dequantized(), torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert (hf(ids).logits - ours(ids).logits).abs().max() < 1e-3


def test_dynamic_groups_refused_by_compressed_tensors_before_work(tiny_llama, tmp_path):
    q = quantize(str(tiny_llama), method="gptq", bits=4, group_size=32, static_groups=False,
                 **CALIB)
    with pytest.raises(ConfigError, match="--static-groups"):
        save(q, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()


def test_gptq_option_errors():
    from quantbench.quant.run import make_config
    from quantbench.registry import get_method

    with pytest.raises(ConfigError, match="damp_percent"):
        get_method("gptq")(make_config("gptq", 4, 32, damp_percent=2.0))
    with pytest.raises(TypeError):
        make_config("gptq", 4, 32, no_such_option=1)
