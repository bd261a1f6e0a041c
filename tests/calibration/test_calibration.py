import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantbench.calibration.collectors import (ActMagnitudeCollector, HessianCollector,
                                               ImportanceCollector)
from quantbench.calibration.data import CalibrationSpec, load_calibration_docs, sample_windows
from quantbench.calibration.pipeline import _skeleton, capture_inputs, run_pipeline
from quantbench.eval.data import load_eval_text
from quantbench.models.loader import load_model


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

    class Keep:
        def __init__(self, w):
            self.w = w

        def dequantize(self):
            return self.w.float()

    seen = []
    targets = {n for n in model.weights.names() if n.endswith("proj.weight")}
    for index, tensors in run_pipeline(model, windows, targets, "hessian",
                                       lambda name, w, h: Keep(w), batch_size=2):
        seen.append(index)
        assert all(isinstance(tensors[n], Keep) for n in tensors if n in targets)
    assert seen == [0, 1]
