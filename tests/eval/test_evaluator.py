import torch
from transformers import AutoTokenizer

from quantbench.eval.evaluator import evaluate
from quantbench.eval.protocol import EvalProtocol
from quantbench.eval.run import source_factory
from quantbench.models.loader import load_model

PROTO = EvalProtocol(ctx=64, max_tokens=512)


def _perturbed(model):
    def build():
        fn = source_factory(model)()
        return lambda ids: fn(ids) + 0.5 * torch.sin(torch.arange(fn(ids).shape[-1]).float())
    return build


def test_lock_step_and_cache(tiny_llama, tmp_path):
    model = load_model(tiny_llama)
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    report = evaluate(source_factory(model), {"same": source_factory(model),
                                              "noisy": _perturbed(model)},
                      tok, PROTO, baseline_key="k", cache_dir=tmp_path, progress=False)
    same, noisy = report.results["same"], report.results["noisy"]
    assert abs(same.delta_ppl_pct) < 1e-6 and same.kld_mean < 1e-8 and same.top1 == 1.0
    assert noisy.kld_mean > 1e-3 and noisy.top1 < 1.0
    assert same.n_tokens == report.baseline.n_tokens == 8 * 63
    assert not report.baseline.cached

    def never():
        raise AssertionError("baseline must come from the cache")

    again = evaluate(never, {}, tok, PROTO, baseline_key="k", cache_dir=tmp_path, progress=False)
    assert again.baseline.cached and again.baseline.ppl == report.baseline.ppl
    other = evaluate(source_factory(model), {}, tok, EvalProtocol(ctx=64, max_tokens=256),
                     baseline_key="k", cache_dir=tmp_path, progress=False)
    assert not other.baseline.cached
    half = evaluate(source_factory(model), {}, tok, EvalProtocol(ctx=64, max_tokens=512,
                                                                 scoring="half"),
                    baseline_key="k", cache_dir=None, progress=False)
    assert half.baseline.n_tokens == 8 * (64 - 32 - 1)
