"""Integration on the real sample model (SmolLM2-135M-Instruct, FP16 from its Q4_1 GGUF)."""
import pytest
import torch

from quantbench.api import quantize, save
from quantbench.eval.evaluator import evaluate
from quantbench.eval.protocol import EvalProtocol
from quantbench.eval.run import artifact_factory, source_factory
from quantbench.formats.io import open_artifact
from quantbench.models.torch_model import build_causal_lm
from quantbench.quant.methods.rtn import rtn_quantize

pytestmark = pytest.mark.slow

PROTOCOL = EvalProtocol(ctx=512, max_tokens=2048)  # 4 windows: fast, and stable enough here


@pytest.fixture(scope="module")
def artifacts(sample, tmp_path_factory):
    root = tmp_path_factory.mktemp("sample-artifacts")
    jobs = {
        "absmax-w8-ch": ("absmax", 8, -1, "compressed-tensors"),
        "absmax-w4-g64": ("absmax", 4, 64, "compressed-tensors"),
        "zeropoint-w4-g64": ("zeropoint", 4, 64, "compressed-tensors"),
        "zeropoint-w4-g64-dense": ("zeropoint", 4, 64, "dense"),
    }
    out = {}
    for name, (method, bits, group, fmt) in jobs.items():
        q = quantize(sample, method=method, bits=bits, group_size=group)
        out[name] = (q, save(q, root / name, format=fmt))
    return out


@pytest.fixture(scope="module")
def report(sample, artifacts, tmp_path_factory):
    factories = {name: artifact_factory(open_artifact(path)) for name, (_, path) in
                 artifacts.items()}
    return evaluate(source_factory(sample), factories, sample.tokenizer(), PROTOCOL,
                    baseline_key=sample.fingerprint(), cache_dir=tmp_path_factory.mktemp("cache"),
                    progress=False)


def test_sample_provenance(sample):
    assert sample.config["model_type"] == "llama" and sample.config["hidden_size"] == 576
    assert sample.meta["sample"]["dequantized_from"]


def test_read_back_bit_exact(sample, artifacts):
    q, path = artifacts["zeropoint-w4-g64"]
    art = open_artifact(path)
    assert art.format == "compressed-tensors"
    assert sorted(art.quantized_names) == sorted(q.targets)
    for name in q.targets[:14]:
        expect = rtn_quantize(sample.weights.get(name), q.config.grid, torch.float16)
        assert art.quantized(name).equal(expect), name
    dense = open_artifact(artifacts["zeropoint-w4-g64-dense"][1])
    for name in q.targets[:14]:
        assert torch.equal(dense.weights.get(name), art.quantized(name).dequantize(torch.float16))


def test_quality_bounds(report):
    r = report.results
    assert abs(r["absmax-w8-ch"].delta_ppl_pct) < 1.0
    assert r["zeropoint-w4-g64"].ppl < r["absmax-w4-g64"].ppl
    assert r["zeropoint-w4-g64"].kld_mean < r["absmax-w4-g64"].kld_mean
    # dense holds the same numbers rounded to fp16; compressed-tensors is evaluated exactly
    assert r["zeropoint-w4-g64-dense"].ppl == pytest.approx(r["zeropoint-w4-g64"].ppl, rel=2e-3)


@pytest.mark.parametrize("name,dequantize", [
    ("absmax-w4-g64", False),            # compressed modules, as vLLM-style loaders run it
    ("zeropoint-w4-g64", True),          # asymmetric: transformers 5.24 loads it dequantized
    ("zeropoint-w4-g64-dense", False),   # plain checkpoint
])
def test_transformers_loads_our_outputs(artifacts, name, dequantize):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path = artifacts[name][1]
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs).eval()
    art = open_artifact(path)
    tensors = art.dequantized()
    if dequantize:  # that loader materialises scale·(code−zero) in the fp16 scale dtype
        tensors = ((n, t.half()) if n in art.quantized_names else (n, t) for n, t in tensors)
    ours = build_causal_lm(art.config, tensors, torch.float32)
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = hf(ids).logits, ours(ids).logits
    assert (a - b).abs().max() < 1e-3, float((a - b).abs().max())


@pytest.fixture(scope="module")
def calibrated(sample, tmp_path_factory):
    """3-bit group 64 (4-bit differences are muted on this Q4_1-derived sample): RTN vs GPTQ
    vs AWQ on the same small calibration set, written in the layouts runtimes load."""
    root = tmp_path_factory.mktemp("calibrated")
    calib = dict(calib_samples=4, calib_len=256)
    jobs = {
        "zeropoint": (dict(method="zeropoint"), "gptq"),
        "gptq": (dict(method="gptq", symmetric=False, act_order=True, static_groups=True,
                      **calib), "gptq"),
        "awq": (dict(method="awq", symmetric=False, search_samples=2, **calib), "awq"),
    }
    bits = {"awq": 4}
    out = {}
    for name, (kwargs, fmt) in jobs.items():
        q = quantize(sample, bits=bits.get(name, 3), group_size=64, **kwargs)
        out[name] = open_artifact(save(q, root / name, format=fmt))
    rtn4 = quantize(sample, method="zeropoint", bits=4, group_size=64)
    out["zeropoint4"] = open_artifact(save(rtn4, root / "zeropoint4", format="awq"))
    report = evaluate(source_factory(sample), {n: artifact_factory(a) for n, a in out.items()},
                      sample.tokenizer(), EvalProtocol(ctx=512, max_tokens=1024),
                      baseline_key=sample.fingerprint())
    return out, report


def test_gptq_and_awq_beat_round_to_nearest(calibrated):
    arts, report = calibrated
    r = report.results
    assert arts["gptq"].format == "gptq" and arts["awq"].format == "awq"
    assert r["gptq"].kld_mean < 0.8 * r["zeropoint"].kld_mean
    assert r["gptq"].ppl < r["zeropoint"].ppl
    assert r["awq"].kld_mean < r["zeropoint4"].kld_mean  # AWQ's layout is 4-bit only
    assert r["awq"].ppl < r["zeropoint4"].ppl
