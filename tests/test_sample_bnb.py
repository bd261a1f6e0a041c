"""The bitsandbytes family on the real sample model: quality bounds through our evaluator, and
transformers + bitsandbytes (CPU) running our files with our evaluator's logits."""
import pytest
import torch

from quantbench.api import quantize, save
from quantbench.eval.evaluator import evaluate
from quantbench.eval.protocol import EvalProtocol
from quantbench.eval.run import artifact_factory, source_factory
from quantbench.formats.io import open_artifact

pytestmark = pytest.mark.slow
pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e .[test])")

PROTOCOL = EvalProtocol(ctx=512, max_tokens=1024)
JOBS = {  # name: (method, options, format)
    # bitsandbytes' default threshold 6.0 gives +2.0 % on this model (README); 2.0 keeps ~0.8 %
    "llm_int8-t2": ("llm_int8", {"calib_samples": 4, "calib_len": 256, "threshold": 2.0},
                    "bitsandbytes"),
    "nf4-dq": ("nf4", {"double_quant": True}, "bitsandbytes"),
    "zeropoint-w4-g64": ("zeropoint", {"bits": 4, "group_size": 64}, "compressed-tensors"),
}


@pytest.fixture(scope="module")
def written(sample, tmp_path_factory):
    root = tmp_path_factory.mktemp("bnb-sample")
    return {name: save(quantize(sample, method=method, **opts), root / name, format=fmt)
            for name, (method, opts, fmt) in JOBS.items()}


@pytest.fixture(scope="module")
def report(sample, written, tmp_path_factory):
    factories = {name: artifact_factory(open_artifact(path)) for name, path in written.items()}
    return evaluate(source_factory(sample), factories, sample.tokenizer(), PROTOCOL,
                    baseline_key=sample.fingerprint(), cache_dir=tmp_path_factory.mktemp("c"),
                    progress=False)


def test_quality_bounds(report):
    r = report.results
    assert abs(r["llm_int8-t2"].delta_ppl_pct) < 1.0, r["llm_int8-t2"]
    assert r["llm_int8-t2"].kld_mean < 0.012
    # NF4 + double quant (4.14 bits/weight) beats int4 zero-point RTN g64 (4.31)
    assert r["nf4-dq"].kld_mean < 0.9 * r["zeropoint-w4-g64"].kld_mean, r["nf4-dq"]


def test_bits_per_weight_are_honest(written):
    bpw = {n: open_artifact(written[n]).manifest["summary"]["bits_per_weight_quantized"]
           for n in ("nf4-dq", "llm_int8-t2")}
    assert 4.12 < bpw["nf4-dq"] < 4.2 and 8.0 < bpw["llm_int8-t2"] < 8.1


@pytest.mark.parametrize("name", ["nf4-dq", "llm_int8-t2"])
def test_transformers_runs_our_sample_files(written, name, bnb_reference_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(written[name]), device_map="cpu")
    for p in hf.parameters():  # the float layers in float32, as our evaluator computes
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    bnb_reference_path(hf)  # not the fused bfloat16 CPU kernel: see test_bitsandbytes.py
    ids = torch.randint(0, 49152, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
    ours = artifact_factory(open_artifact(written[name]))()(ids).float()
    assert torch.allclose(ours, ref, rtol=0, atol=1e-4), (ours - ref).abs().max()
