"""GGUF on the real sample (slow): llama.cpp runs our files with our tokens and perplexity, our
RTN mixture is byte-identical to llama-quantize's, and imatrix beats RTN."""
from __future__ import annotations

import pytest

from quantbench.api import quantize, save
from quantbench.eval.evaluator import evaluate
from quantbench.eval.protocol import EvalProtocol
from quantbench.eval.run import artifact_factory, source_factory
from quantbench.formats.io import open_artifact

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def written(sample, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-sample")
    jobs = {"F16": ("rtn", {}), "Q4_K_M": ("rtn", {}),
            "Q4_K_M-imatrix": ("imatrix", {"calib_samples": 16, "calib_len": 256})}
    return {name: save(quantize(sample, method=method, gguf_type=name.split("-")[0], **opts),
                       root / name, format="gguf")
            for name, (method, opts) in jobs.items()}


# Q4_K_M mixes Q4_K, Q6_K (and their Q8_K activation rounding); Q8_0 weights with Q8_0
# activations are scored against llama-perplexity on the real Gemma 3 270M file
# (tests/test_sample_gemma3.py, whose tied Q8_0 embedding is the output matmul)
@pytest.mark.parametrize("name", ["Q4_K_M"])
def test_llama_perplexity_equals_ours(sample, written, name, llama_vs_ours):
    ours, theirs, same_tokens = llama_vs_ours(written[name], sample, ctx=512, chunks=8)
    assert same_tokens  # llama.cpp's tokenization of the eval text is the HF tokenizer's
    assert abs(ours / theirs - 1) < 0.005, (ours, theirs)


def test_rtn_mixture_is_llama_quantize_byte_for_byte(written, llamacpp, tmp_path):
    """Q4_K_M on the sample's shapes: 576-wide rows fall back to Q5_0/Q8_0, ffn_down (1536)
    keeps Q4_K/Q6_K; llama-quantize on our F16 file writes the same bytes as our writer."""
    theirs = tmp_path / "theirs.gguf"
    llamacpp.run("llama-quantize", written["F16"] / "model.gguf", theirs, "Q4_K_M", "2")
    art, ours = open_artifact(theirs), open_artifact(written["Q4_K_M"])
    assert sorted(art.quantized_names) == sorted(ours.quantized_names)
    for name in ours.quantized_names:
        assert art.quantized(name).equal(ours.quantized(name)), name


def test_imatrix_beats_rtn(sample, written, tmp_path):
    protocol = EvalProtocol(ctx=512, max_tokens=2048)
    factories = {n: artifact_factory(open_artifact(written[n]))
                 for n in ("Q4_K_M", "Q4_K_M-imatrix")}
    r = evaluate(source_factory(sample), factories, sample.tokenizer(), protocol,
                 baseline_key=sample.fingerprint(), cache_dir=tmp_path, progress=False).results
    assert r["Q4_K_M-imatrix"].kld_mean < 0.95 * r["Q4_K_M"].kld_mean, r
