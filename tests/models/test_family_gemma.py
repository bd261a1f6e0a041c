"""Gemma 2 and Gemma 3 (text): tiny random models from transformers' own config classes, with
a SentencePiece tokenizer as Gemma ships one (tokenizer.model + tokenizer.json, BOS added).

What is checked: the calibration walk and AWQ folding respect ``(1 + w)`` norms and post-branch
norms (the float function is unchanged), every safetensors format reloads in transformers with
our reader's logits, our GGUF equals llama.cpp's converter output (metadata, names, norms + 1)
and runs in llama.cpp with our evaluator's perplexity, the converter's GGUF imports back to the
original logits."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from quantbench.api import quantize, save
from quantbench.formats.io import open_artifact
from quantbench.models.loader import load_model
from quantbench.models.torch_model import build_causal_lm
from tests.conftest import (TINY_VOCAB, _wikitext_head, assert_gptqmodel_reloads,
                            bnb_float_model, needs_gptqmodel)
from tests.formats.test_gguf_meta import (
    assert_imports_back,
    assert_matches_converter,
    assert_quantizes_like_llama_quantize,
    converter,  # noqa: F401  (a fixture)
)

IDS = torch.randint(4, TINY_VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))


def make_gemma_tokenizer(directory: Path, add_bos: bool = True) -> None:
    """A SentencePiece BPE (byte fallback, no dummy prefix, Gemma's special ids) saved as
    tokenizer.model and as transformers' GemmaTokenizer (tokenizer.json)."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    from quantbench.formats.gguf_vocab import spm_pieces

    text = _wikitext_head(100_000)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([text[i:i + 2000] for i in range(0, len(text), 2000)]),
        model_writer=model, vocab_size=TINY_VOCAB, model_type="bpe", byte_fallback=True,
        character_coverage=0.99, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, minloglevel=2)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    pieces = spm_pieces(directory / "tokenizer.model")
    ids = {p: i for i, (p, _, _) in enumerate(pieces)}
    scores = {p: s for p, s, kind in pieces if kind == 1}
    GemmaTokenizer(vocab=ids, merges=generate_merges(ids, scores), mask_token="<unk>",
                   add_bos_token=add_bos).save_pretrained(str(directory))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": add_bos,
        "add_eos_token": False,
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"}))


def make_tiny_gemma(directory: Path, kind: str, tokenizer_from: Path | None = None,
                    **extra) -> Path:
    """gemma2: 2 layers (sliding, global), soft-caps that bite; gemma3: 6 layers (5 sliding, 1
    global: llama.cpp's default period), q/k norms. Both: one kv head, head_dim 32 ≠ 64/4,
    norms away from their zero init so a missed ``1 + w`` shows. ``extra`` overrides the
    config; ``tokenizer_from`` copies that model's tokenizer files instead of training one."""
    import transformers

    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                  query_pre_attn_scalar=32, max_position_embeddings=512, sliding_window=16,
                  pad_token_id=0, eos_token_id=1, bos_token_id=2)
    common.update(extra)
    torch.manual_seed(0)
    if kind == "gemma2":
        cfg = transformers.Gemma2Config(num_hidden_layers=2, attn_logit_softcapping=5.0,
                                        final_logit_softcapping=3.0, **common)
        model = transformers.Gemma2ForCausalLM(cfg)
    else:
        cfg = transformers.Gemma3TextConfig(num_hidden_layers=6, **common)
        model = transformers.Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    directory.mkdir(parents=True)
    # float16 values stored as float32: llama.cpp's converter adds the norms' + 1 in the
    # stored dtype (float16 would round 1 + w), and its F16 file then holds the weights exactly
    model.to(torch.float16).to(torch.float32).save_pretrained(str(directory))
    if tokenizer_from is None:
        make_gemma_tokenizer(directory)
        return directory
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (directory / f.name).write_bytes(f.read_bytes())
    return directory


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gemma")
    return {kind: make_tiny_gemma(root / kind, kind) for kind in ("gemma2", "gemma3")}


def _hf_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.inference_mode():
        return hf(IDS).logits


def _our_logits(out: Path) -> torch.Tensor:
    art = open_artifact(out)
    with torch.inference_mode():
        return build_causal_lm(art.config, art.dequantized(), torch.float32)(IDS).logits


# ---------------------------------------------------------------------------------- numerics

def test_awq_folds_into_one_plus_w_norms():
    """Folding s into a Gemma norm: (1 + w') = (1 + w) / s, the branch input becomes x / s."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    from quantbench.quant.awq import fold_scales

    torch.manual_seed(0)
    norm, lin = Gemma2RMSNorm(16), torch.nn.Linear(16, 8, bias=False)
    norm.weight.data.normal_(0, 0.5)
    x = torch.randn(3, 16)
    want = lin(norm(x))
    fold_scales(norm, [lin], torch.rand(16) + 0.5, offset=1.0)
    torch.testing.assert_close(lin(norm(x)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_awq_keeps_the_float_model_and_formats_reload(kind, tiny_gemma, tmp_path):
    """AWQ (scales folded into (1 + w) norms and v→o, up→down) then dense and
    compressed-tensors: transformers reloads both with our reader's logits, and the quantized
    model stays near the float one (a wrong fold would not)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    src = tiny_gemma[kind]
    q = quantize(load_model(src), method="awq", bits=8, group_size=32, calib_samples=4,
                 calib_len=32)
    want = _hf_logits(src)
    # compressed-tensors: dequantized by its loader (transformers 5 cannot build the
    # compressed modules of asymmetric files, see tests/formats/test_compressed_tensors.py)
    for fmt, kwargs in (("dense", {}), ("compressed-tensors", {
            "quantization_config": CompressedTensorsConfig(dequantize=True)})):
        out = save(q, tmp_path / fmt, format=fmt)
        ours = _our_logits(out)
        hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float16, **kwargs)
        with torch.inference_mode():  # its fp16 load rounds what we compute in fp32
            torch.testing.assert_close(hf.float().eval()(IDS).logits, ours, rtol=1e-3,
                                       atol=2e-3)
        assert (ours - want).abs().max() < 0.05 * want.abs().max(), fmt


@pytest.mark.parametrize("kind,method,fmt", [("gemma2", "gptq", "gptq"),
                                             ("gemma3", "nf4", "bitsandbytes")])
def test_other_formats_round_trip(kind, method, fmt, tiny_gemma, tmp_path):
    """GPTQ (act-order, attention-weighted values through Gemma 2's soft-capped attention)
    into the gptq format, read back as the dense copy of the same codes; NF4 into bitsandbytes, which transformers
    runs with our logits."""
    opts = dict(bits=4, group_size=32, act_order=True, calib_samples=4, calib_len=32) \
        if method == "gptq" else {}
    q = quantize(load_model(tiny_gemma[kind]), method=method, **opts)
    out = save(q, tmp_path / fmt, format=fmt)
    art = open_artifact(out)
    assert sorted(art.quantized_names) == sorted(q.targets)
    if fmt == "bitsandbytes":
        hf = bnb_float_model(out)
        with torch.inference_mode():
            theirs = hf(input_ids=IDS).logits.float()
        from quantbench.eval.run import artifact_factory
        assert torch.equal(artifact_factory(art)()(IDS).float(), theirs)
    else:
        dense = save(q, tmp_path / "dense", format="dense")  # the same codes, unpacked
        torch.testing.assert_close(_our_logits(out), _our_logits(dense), rtol=1e-3, atol=1e-3)


@pytest.mark.slow
@needs_gptqmodel
@pytest.mark.parametrize("kind,fmt", [("gemma2", "awq"), ("gemma3", "gptq")])
def test_gptqmodel_reloads_gptq_and_awq(kind, fmt, tiny_gemma, tmp_path):
    """transformers + GPTQModel's CPU kernels (peer venv) run our gptq / awq files of Gemma
    (soft-capped Gemma 2 with AWQ folded into its 1+w norms; Gemma 3 GPTQ act-order) with
    our logits."""
    options = {"act_order": True, "symmetric": False} if fmt == "gptq" else {}
    q = quantize(load_model(tiny_gemma[kind]), method=fmt, bits=4, group_size=32,
                 calib_samples=4, calib_len=32, progress=False, **options)
    out = save(q, tmp_path / fmt, format=fmt, progress=False)
    assert_gptqmodel_reloads(out, IDS, _our_logits(out), tmp_path)


# --------------------------------------------------------------------------------- GGUF

@pytest.mark.slow  # two converter runs
@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_gguf_matches_converter_and_imports_back(kind, tiny_gemma, converter, tmp_path):
    reader = assert_matches_converter(converter, tiny_gemma[kind], tmp_path / "ref.gguf")
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert_imports_back(tmp_path / "ref.gguf", tiny_gemma[kind], tmp_path / "back")


@pytest.mark.slow  # a converter run, one llama-quantize
@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_q4_k_m_is_llama_quantize_byte_for_byte(kind, tiny_gemma, converter, llamacpp,
                                                tmp_path):
    """Rows of 256 and 512 (whole k-quant super-blocks; llama.cpp has no Gemma-specific
    mixture rule): the tied token_embd takes output's Q6_K, attn_v/ffn_down the use-more-bits
    layers' Q6_K, and llama-quantize of the converter's F16 file holds every tensor (norms + 1
    included) in our type with our bytes."""
    wide = make_tiny_gemma(tmp_path / "wide", kind, tiny_gemma[kind], hidden_size=256,
                           intermediate_size=512, head_dim=64, query_pre_attn_scalar=64)
    reader = assert_quantizes_like_llama_quantize(llamacpp, converter, wide, "Q4_K_M",
                                                  tmp_path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q6_K"
    more_bits = {"gemma2": ["Q4_K", "Q6_K"],
                 "gemma3": ["Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K"]}[kind]
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(len(more_bits))] == more_bits


@pytest.mark.slow
@pytest.mark.parametrize("kind,gguf_type", [("gemma2", "Q8_0"), ("gemma3", "Q8_0")])
def test_llama_cpp_perplexity_equals_ours(kind, gguf_type, tiny_gemma, tmp_path, llama_vs_ours):
    """Sliding/global layers with their own RoPE bases, soft-caps, (1 + w) norms stored + 1:
    llama.cpp's perplexity is ours — with Gemma's BOS, which llama-perplexity writes over each
    chunk's first token (our half scoring cuts the same windows)."""
    model = load_model(tiny_gemma[kind])
    assert model.tokenizer()("a b").input_ids[0] == model.tokenizer().bos_token_id
    out = save(quantize(model, method="rtn", gguf_type=gguf_type), tmp_path / kind,
               format="gguf")
    ours, theirs, same_tokens = llama_vs_ours(out, model, ctx=64, chunks=4)
    assert same_tokens
    assert abs(ours / theirs - 1) < 0.005, (ours, theirs)


# ------------------------------------------------------------------- every other method

# (method, quantize options, format): EXL2's measurement and allocation, GGUF imatrix / GPTQ /
# AWQ-then-GPTQ (scales folded into the (1 + w) norms the GGUF stores + 1), LLM.int8
CALIB = dict(calib_samples=2, calib_len=32)
METHODS = {
    "exl2": (dict(method="exl2", bpw=4.0, batch_size=2, measure_samples=2, **CALIB), "exl2"),
    "imatrix": (dict(method="imatrix", gguf_type="Q4_K_M", **CALIB), "gguf"),
    "gguf-gptq": (dict(method="gptq", gguf_type="Q4_K_M", **CALIB), "gguf"),
    "gguf-awq": (dict(method="awq", then="gptq", gguf_type="Q4_K_M", n_grid=3, **CALIB),
                 "gguf"),
    "llm_int8": (dict(method="llm_int8", **CALIB), "bitsandbytes"),
}


def _block_tensors(q) -> dict:
    """Every tensor the quantized model holds (blocks are computed once and kept)."""
    return {n: t for _, block in q.iter_blocks() for n, t in block.items()}


def _kld(out: Path, model) -> float:
    from quantbench.eval.run import evaluate_one

    report = evaluate_one(out, baseline=model, ctx=64, max_tokens=256, use_cache=False,
                          progress=False, device="cpu")
    return next(iter(report.results.values())).kld_mean


@pytest.fixture(scope="session")
def rtn_q4_kld(tiny_gemma, tmp_path_factory) -> dict[str, float]:
    """Our evaluator's KLD of the plain Q4_K_M rounding of each tiny Gemma."""
    root = tmp_path_factory.mktemp("gemma-rtn")
    return {kind: _kld(save(quantize(load_model(src), method="rtn", gguf_type="Q4_K_M",
                                     progress=False), root / kind, format="gguf",
                            progress=False), load_model(src))
            for kind, src in tiny_gemma.items()}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_every_method_writes_reads_back_and_evaluates(kind, method, tiny_gemma, rtn_q4_kld,
                                                      tmp_path, monkeypatch):
    """Each quantized tensor reads back as the method produced it (AWQ-folded norms too: the
    GGUF's + 1 comes off); our evaluator's KLD is finite and small — for the GGUF methods at
    most 1.25× plain Q4_K_M rounding's (a fold that ignores Gemma's ``1 + w`` gives 7×);
    transformers runs the LLM.int8 file with our logits."""
    import math

    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))  # EXL2's measurement
    opts, fmt = METHODS[method]
    model = load_model(tiny_gemma[kind])
    q = quantize(model, progress=False, **opts)
    out = save(q, tmp_path / fmt, format=fmt, progress=False)
    art, held = open_artifact(out), _block_tensors(q)
    assert sorted(art.quantized_names) == sorted(q.targets)
    for name in q.targets:
        assert art.quantized(name).equal(held[name]), name
    norms = sorted(set(held) - set(q.targets))
    for name in norms:  # AWQ's folded into input/pre-feedforward norms, the others as loaded
        torch.testing.assert_close(art.weights.get(name).float(), held[name].float(), rtol=0,
                                   atol=1e-6, msg=name)
    folded = [n for n in norms if not torch.equal(held[n], model.weights.get(n).float())]
    assert bool(folded) == (method == "gguf-awq"), folded
    if method == "exl2":  # measured, then allocated under the target
        assert json.loads((out / "exl2_strategy.json").read_text())["achieved_bpw"] <= 4.0
    kld = _kld(out, model)
    bound = 1.25 * rtn_q4_kld[kind] if fmt == "gguf" else 0.01
    assert math.isfinite(kld) and kld < bound, (kld, bound)
    if fmt == "bitsandbytes":
        from quantbench.eval.run import artifact_factory

        hf = bnb_float_model(out)
        with torch.inference_mode():
            theirs = hf(input_ids=IDS).logits.float()
        assert torch.equal(artifact_factory(art)()(IDS).float(), theirs)


def test_untied_gemma2_gguf_is_refused_and_untied_gemma3_is_written(tmp_path, capsys,
                                                                    monkeypatch):
    """llama.cpp's gemma2 always reuses token_embd as the head (a file with output.weight
    fails to load: "wrong number of tensors"), so an untied Gemma 2 gets no GGUF, refused in
    one line before any work; Gemma 3's loader takes a separate head, so its file holds it."""
    import gguf

    from tests.faults.conftest import _qb, assert_no_leftovers, assert_refused

    monkeypatch.setenv("COLUMNS", "400")
    out = tmp_path / "outputs"
    g2 = make_tiny_gemma(tmp_path / "g2", "gemma2", tie_word_embeddings=False)
    assert_refused(_qb(capsys, "convert", g2, "-o", out / "g2", "--type", "Q8_0"),
                   "tie_word_embeddings", "gemma2")
    assert_no_leftovers(out)
    g3 = make_tiny_gemma(tmp_path / "g3", "gemma3", tie_word_embeddings=False)
    assert _qb(capsys, "convert", g3, "-o", out / "g3", "--type", "Q8_0").code == 0
    names = {t.name for t in gguf.GGUFReader(str(out / "g3" / "model.gguf")).tensors}
    assert "output.weight" in names
