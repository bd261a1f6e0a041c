"""The evaluator's bounded vocabulary head: scored a few positions at a time, its results are
those of whole-window logits, and no model's head ever makes more than ``LOGITS_BYTES`` of
logits at once; the head is the model's own (soft-capping, runtime modules)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from quantbench.eval import evaluator
from quantbench.eval.protocol import EvalProtocol
from quantbench.models.loader import load_model
from quantbench.models.torch_model import CausalLM, build_causal_lm, logits_fn

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    model = load_model(tiny_llama)
    return model, model.tokenizer()


def _net(model, noise: float = 0.0) -> torch.nn.Module:
    """The tiny model in float32; ``noise``: its weights perturbed (a stand-in candidate)."""
    net = build_causal_lm(model.config, model.weights.iter(model.weights.names()), torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(noise * p.std() * torch.randn(p.shape, generator=gen))
    return net


def _whole(net):
    """Today's model callable before the bounded head: the full forward's logits."""
    return lambda ids: net(input_ids=ids, use_cache=False).logits


def _largest_head_output(net, seen: list[int]) -> None:
    """Record the positions of every output of ``net``'s head module (however it is called)."""
    net.get_output_embeddings().register_forward_hook(
        lambda _m, _i, out: seen.append(out.numel() // out.shape[-1]))


@pytest.mark.parametrize("scoring,batch", [("full", 2), ("half", 1)])
def test_chunks_of_seven_positions_equal_whole_window_logits(tiny, monkeypatch, scoring, batch):
    model, tok = tiny
    protocol = EvalProtocol(ctx=64, max_tokens=256, scoring=scoring, batch_size=batch)
    base, noisy = _net(model), _net(model, 0.5)
    whole = evaluator.evaluate(lambda: _whole(base), {"noisy": lambda: _whole(noisy)}, tok,
                               protocol, "k", progress=False)
    seen: list[int] = []
    for net in (base, noisy):
        _largest_head_output(net, seen)
    monkeypatch.setattr(evaluator, "LOGITS_BYTES", 7 * 4 * 320)  # 7 positions of 320 logits
    chunked = evaluator.evaluate(lambda: logits_fn(base, CPU), {"noisy": lambda: logits_fn(
        noisy, CPU)}, tok, protocol, "k", progress=False)
    assert max(seen) == 7
    scored = 4 * protocol.scored_per_window()
    assert chunked.baseline.n_tokens == whole.baseline.n_tokens == scored
    assert chunked.baseline.ppl == pytest.approx(whole.baseline.ppl, rel=1e-6)
    ours, ref = (dataclasses.asdict(r.results["noisy"]) for r in (chunked, whole))
    assert ref["kld_mean"] > 1e-3 and ref["top1"] < 0.9  # a candidate that differs
    for key in ("ppl", "delta_ppl_pct", "kld_mean", "kld_p99", "top1", "n_tokens"):
        assert ours[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key


def test_the_head_never_makes_more_logits_than_the_bound(tiny, monkeypatch):
    """Peak memory without timing: every call of the head module, at a bound of 100 positions'
    logits, over two windows of 63 scored positions per batch, makes at most 100 rows."""
    model, tok = tiny
    net, seen = _net(model), []
    _largest_head_output(net, seen)
    monkeypatch.setattr(evaluator, "LOGITS_BYTES", 100 * 4 * 320 + 3)
    report = evaluator.evaluate(lambda: logits_fn(net), {"same": lambda: logits_fn(net)}, tok,
                                EvalProtocol(ctx=64, max_tokens=256, batch_size=2), "k",
                                progress=False)
    assert report.results["same"].kld_mean == 0.0 and report.results["same"].top1 == 1.0
    assert max(seen) * 320 * 4 <= evaluator.LOGITS_BYTES and sorted(set(seen)) == [26, 100]


def test_the_bound_at_a_gemma3_vocabulary():
    assert evaluator.chunk_rows(262_144) == 64 and evaluator.chunk_rows(10**9) == 1


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=320, initializer_range=0.5)  # large logits
FAMILIES = {  # config class, model class, config entries beyond SMALL
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=16, sliding_window=8, final_logit_softcapping=3.0)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(head_dim=16, sliding_window=8, final_logit_softcapping=3.0)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0, eos_token_id=1)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_head_is_the_families_own_as_transformers_runs_it(family):
    """Body then head, whole or 7 positions at a time, give transformers' logits: Gemma's final
    soft-capping (``cap·tanh(logits/cap)``, here with the cap in play) included."""
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**SMALL, **extra)
    net = getattr(transformers, model_cls)(config).eval()
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    lm = logits_fn(net, CPU)
    with torch.inference_mode():
        ref = net(input_ids=ids, use_cache=False).logits
        hidden = lm.hidden(ids)
        rows = hidden.reshape(-1, 64)
        chunked = torch.cat([lm.head(rows[i:i + 7]) for i in range(0, len(rows), 7)])
        uncapped = net.lm_head(hidden)
    torch.testing.assert_close(lm(ids), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, ref.reshape(-1, 320), rtol=1e-5, atol=1e-5)
    if "final_logit_softcapping" in extra:
        assert (uncapped - ref).abs().max() > 1.0 and ref.abs().max() <= 3.0


def test_a_runtime_module_swapped_into_the_head_is_the_head(tiny):
    """GGUF activation rounding on lm_head (a tied token_embd serves as the head) and in the
    body is what the chunked head computes."""
    from quantbench.models.runtime import apply_runtime

    model, _ = tiny
    artifact = type("Artifact", (), {"runtime": {"gguf_activations": {
        "lm_head": "Q8_0", "model.layers.0.mlp.down_proj": "Q8_0"}}})()
    plain, net = _net(model), apply_runtime(_net(model), artifact)
    ids = torch.randint(0, 320, (1, 32), generator=torch.Generator().manual_seed(2))
    lm = CausalLM(net)
    with torch.inference_mode():
        ref, before = net(input_ids=ids).logits, plain(input_ids=ids).logits
        rows = lm.hidden(ids).reshape(-1, 64)
        chunked = torch.cat([lm.head(rows[i:i + 5]) for i in range(0, 32, 5)])
    assert not torch.equal(ref, before)
    torch.testing.assert_close(chunked, ref.reshape(-1, 320), rtol=0, atol=1e-6)
