import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantbench.calibration.collectors import (ActMagnitudeCollector, HessianCollector,
                                               ImportanceCollector)
from quantbench.calibration.data import CalibrationSpec, load_calibration_docs, sample_windows
from quantbench.calibration.pipeline import _skeleton, capture_inputs, run_pipeline
from quantbench.eval.data import load_eval_text
from quantbench.models.loader import load_model
from quantbench.quant.methods.base import Method


def test_collectors_accumulate_exactly():
    torch.manual_seed(0)
    xs = [torch.randn(3, 5, 8) for _ in range(4)]
    h, a, imp = HessianCollector(8), ActMagnitudeCollector(8), ImportanceCollector(8)
    for x in xs:
        for c in (h, a, imp):
            c.add(x)
    X = torch.cat([x.reshape(-1, 8) for x in xs]).double()
    assert torch.allclose(h.result().double(), 2 * X.T @ X / len(X), atol=1e-5)
    assert torch.allclose(a.result().double(), X.abs().mean(0), atol=1e-6)
    assert torch.allclose(imp.result().double(), (X * X).mean(0), atol=1e-6)


def test_windows_are_seeded_and_disjoint_from_eval(tiny_llama):
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    a = sample_windows(tok, CalibrationSpec(n_samples=6, seq_len=32, seed=1))
    b = sample_windows(tok, CalibrationSpec(n_samples=6, seq_len=32, seed=1))
    c = sample_windows(tok, CalibrationSpec(n_samples=6, seq_len=32, seed=2))
    assert a.shape == (6, 32) and torch.equal(a, b) and not torch.equal(a, c)
    docs = load_calibration_docs()
    assert len(docs) == 1025
    wiki = load_eval_text().text
    assert not any(doc[:200] in wiki for doc in docs[:200])


def test_pipeline_propagates_exactly_what_the_model_computes(tiny_llama):
    """With a quantizer that changes nothing, every block's captured input equals the HF
    model's hidden state there: masks and position embeddings are captured right."""
    model = load_model(tiny_llama)
    windows = torch.randint(0, 300, (5, 24), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    with torch.inference_mode():
        states = hf(windows, output_hidden_states=True).hidden_states
    captured = capture_inputs(model, _skeleton(model), windows, batch_size=2)
    assert torch.allclose(torch.cat(captured.hidden), states[0], atol=1e-6)

    targets = {n for n in model.weights.names() if n.endswith("proj.weight")}
    for staged in (True, False):
        seen, method = [], Identity()
        for index, tensors in run_pipeline(model, windows, targets, method, batch_size=2,
                                           staged=staged):
            seen.append(index)
            assert all(isinstance(tensors[n], Keep) for n in tensors if n in targets)
            assert torch.equal(tensors[f"model.layers.{index}.input_layernorm.weight"],
                               model.weights.get(f"model.layers.{index}.input_layernorm.weight"))
        assert seen == [0, 1]
        # every group's Hessian is that of the float model's activations at that linear
        hooks = {}
        for name, mod in hf.named_modules():
            if name.endswith(("q_proj", "o_proj", "gate_proj", "down_proj")):
                hooks[name] = []
                mod.register_forward_hook(lambda m, i, o, s=hooks[name]: s.append(i[0]))
        with torch.inference_mode():
            hf(windows)
        for name, xs in hooks.items():
            x = torch.cat(xs).reshape(-1, xs[0].shape[-1])
            expect = 2 * x.T @ x / len(x)
            got = method.stats[f"{name}.weight"]
            assert torch.allclose(got, expect, atol=1e-4 * expect.abs().max()), (staged, name)
        for m in hf.modules():
            m._forward_hooks.clear()


class Keep:
    def __init__(self, w):
        self.w = w

    def dequantize(self):
        return self.w.float()


class Identity(Method):
    """A method that keeps weights as they are and records each Hessian it is given (the
    contract's defaults for every other hook)."""

    statistic = "hessian"

    def __init__(self):
        self.stats = {}

    def quantize_with_stats(self, name, weight, stat):
        self.stats[name] = stat
        return Keep(weight)


def test_staged_and_whole_block_pipelines_agree(tiny_llama):
    """The branch-by-branch pipeline (fewer forward passes) quantizes like the one that runs
    the whole block per group: same codes up to float rounding at ties."""
    from quantbench.quant.run import make_config, quantize

    model = load_model(tiny_llama)
    windows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(3))
    config = make_config("gptq", 4, 32, False, calib_samples=4, calib_len=32)
    method = quantize(model, config).method
    targets = {n for n in model.weights.names() if n.endswith("proj.weight")}
    runs = [dict(t for _, block in run_pipeline(model, windows, targets, method, 2, staged=s)
                 for t in block.items()) for s in (True, False)]
    for name in targets:
        a, b = runs[0][name], runs[1][name]
        assert (a.codes != b.codes).float().mean() < 0.01, name
        assert torch.allclose(a.dequantize(), b.dequantize(), atol=0.05 * a.scales.float().max())


def test_chat_template_wraps_documents(tiny_llama):
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    plain = sample_windows(tok, CalibrationSpec(n_samples=16, seq_len=512, seed=0))
    tok.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    chat = sample_windows(tok, CalibrationSpec(n_samples=16, seq_len=512, seed=0,
                                               chat_template=True))
    bos, eos = tok.convert_tokens_to_ids("<s>"), tok.convert_tokens_to_ids("</s>")
    assert not torch.isin(plain, torch.tensor([bos, eos])).any()
    assert torch.isin(chat, torch.tensor([bos, eos])).any()


def test_hub_dataset_errors_are_one_line(monkeypatch):
    from quantbench.calibration.data import load_calibration_docs
    from quantbench.errors import QuantbenchError

    pytest.importorskip("datasets", reason="hf: calibration data needs the optional datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(QuantbenchError, match="HF_HUB_OFFLINE"):
        load_calibration_docs("hf:allenai/c4:en:validation")


def test_hub_dataset_without_datasets_package_says_what_to_do(monkeypatch):
    import builtins

    from quantbench.calibration.data import load_calibration_docs
    from quantbench.errors import QuantbenchError

    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(QuantbenchError, match="pip install datasets"):
        load_calibration_docs("hf:allenai/c4")


def test_output_input_capture_skips_the_linear_and_restores_it():
    from quantbench.calibration.memory import heap_for_temporaries, pin_mmap_threshold
    from quantbench.calibration.pipeline import capture_output_input

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    down = mlp[2]
    calls = []
    down.register_forward_hook(lambda m, i, o: calls.append(1))
    xs = [torch.randn(2, 3, 8), torch.randn(1, 3, 8)]
    pin_mmap_threshold()
    with heap_for_temporaries():
        seen = capture_output_input(mlp, "2", xs, [{}, {}])
    assert calls == [] and mlp[2] is down          # never computed, put back
    for x, s in zip(xs, seen):
        torch.testing.assert_close(s, mlp[1](mlp[0](x)), rtol=0, atol=0)
    with heap_for_temporaries():                     # usable again (threshold restored)
        assert torch.zeros(1 << 20).sum() == 0


class _BosTokenizer:
    """Characters as ids (offset 10); BOS 1 in front unless ``add_special_tokens=False``."""

    bos_token_id, chat_template = 1, None

    def __call__(self, text, add_special_tokens=True):
        ids = [10 + ord(c) % 200 for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_windows_start_with_bos_when_the_tokenizer_adds_one():
    """Gemma / Llama 2 tokenizers add BOS: every calibration window starts with it (as the
    evaluator's and llama-imatrix's do), then seq_len − 1 text tokens; none inside."""
    w = sample_windows(_BosTokenizer(), CalibrationSpec(n_samples=5, seq_len=16, seed=0))
    assert w.shape == (5, 16)
    assert (w[:, 0] == 1).all() and not (w[:, 1:] == 1).any()


def test_post_norm_weights_count_each_token_as_the_norm_after_the_branch_does():
    """A branch normed on its output (Gemma): token t's error counts 1/rms_t², so the inputs
    are scaled by 1/rms_t (mean square 1) — the weighted Hessian is exactly Σ x xᵀ / rms²."""
    from quantbench.calibration.pipeline import post_norm_weights

    g = torch.Generator().manual_seed(0)
    mixer = torch.nn.Linear(8, 6, bias=False)
    xs = [torch.randn(2, 5, 8, generator=g) * torch.tensor([1.0, 30.0]).view(2, 1, 1)
          for _ in range(2)]
    w = post_norm_weights(mixer, xs, [{}, {}])
    assert [t.shape for t in w] == [(2, 5, 1)] * 2
    allw = torch.cat([t.reshape(-1) for t in w])
    assert torch.allclose(allw.pow(2).mean(), torch.tensor(1.0), atol=1e-5)
    with torch.no_grad():
        rms = [mixer(x).pow(2).mean(-1, keepdim=True).sqrt() for x in xs]
    ratio = torch.cat([(a * r).reshape(-1) for a, r in zip(w, rms)])
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)  # ∝ 1/rms_t
    assert w[0][1].mean() < w[0][0].mean() / 10  # the loud sequence counts far less
