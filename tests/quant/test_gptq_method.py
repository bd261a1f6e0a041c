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
    with pytest.raises(ConfigError, match="method gptq takes no no_such_option option"):
        make_config("gptq", 4, 32, no_such_option=1)


def test_pipeline_sweeps_shared_input_linears_together(tiny_llama, monkeypatch):
    """q/k/v and gate/up go to GPTQ as one stacked call (same tensors as one call each);
    the CPU stacking limit falls back to one call per linear."""
    import quantbench.calibration.pipeline as pipeline
    from quantbench.quant.methods.gptq import GPTQ

    calls = []
    original = GPTQ.quantize_many_with_stats

    def spy(self, names, weights, hessian):
        calls.append([n.rsplit(".", 2)[-2] for n in names])
        return original(self, names, weights, hessian)

    monkeypatch.setattr(GPTQ, "quantize_many_with_stats", spy)

    def run():
        q = quantize(str(tiny_llama), method="gptq", bits=4, group_size=32, **CALIB)
        return {n: t for _, tensors in q.iter_blocks() for n, t in tensors.items()
                if hasattr(t, "codes")}

    stacked = run()
    assert calls[:2] == [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]]
    monkeypatch.setattr(pipeline, "STACK_ELEMENTS_CPU", 0)
    calls.clear()
    single = run()
    assert calls == [] and stacked.keys() == single.keys()
    for name, qt in stacked.items():
        assert (qt.codes == single[name].codes).float().mean() > 0.999, name
        assert qt.meta["gptq_proxy_error"] == pytest.approx(
            single[name].meta["gptq_proxy_error"], rel=1e-2)


def test_float_targets_follow_the_float_model(tiny_llama, tmp_path, monkeypatch):
    """``--float-targets``: the float stream every block's targets come from is the float
    model's own hidden states (transformers' forward on the calibration windows), while the
    quantized stream drifts; the option changes the codes, and is recorded."""
    from transformers import AutoModelForCausalLM

    import quantbench.calibration.pipeline as pipeline

    streams, windows = [], []
    float_inputs, capture = pipeline.float_model_inputs, pipeline.capture_inputs

    def spy_inputs(ctx, sub, ref, kwargs):
        if sub is ctx.model.arch.sublayers[0]:
            streams.append((torch.cat(ref), torch.cat(ctx.hidden)))
        return float_inputs(ctx, sub, ref, kwargs)

    def spy_capture(model, skeleton, batch, *args, **kwargs):
        windows.append(batch)
        return capture(model, skeleton, batch, *args, **kwargs)

    monkeypatch.setattr(pipeline, "float_model_inputs", spy_inputs)
    monkeypatch.setattr(pipeline, "capture_inputs", spy_capture)
    q = quantize(str(tiny_llama), method="gptq", bits=3, group_size=32, float_targets=True,
                 **CALIB)
    out = save(q, tmp_path / "ft", format="dense")
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    with torch.no_grad():
        states = hf(windows[0], output_hidden_states=True).hidden_states
    assert len(streams) == hf.config.num_hidden_layers
    for i, (ref, quantized) in enumerate(streams):
        assert (ref - states[i]).abs().max() < 1e-4 * states[i].abs().max(), i
        if i:
            assert (quantized - states[i]).abs().max() > 1e-3 * states[i].abs().max(), i
    manifest = json.loads((out / "quantbench.json").read_text())
    assert manifest["quantize"]["options"]["float_targets"] is True
    name = "model.layers.1.mlp.down_proj.weight"
    plain = quantize(str(tiny_llama), method="gptq", bits=3, group_size=32, **CALIB)
    codes = [dict(t for _, block in m.iter_blocks() for t in block.items())[name].codes
             for m in (q, plain)]
    assert not torch.equal(*codes)
