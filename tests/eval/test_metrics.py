import math

import pytest
import torch

from quantbench.eval.metrics import perplexity, quantile, score_window, summarize
from quantbench.eval.protocol import EvalProtocol
from quantbench.errors import ConfigError


def test_identical_logits():
    torch.manual_seed(0)
    logits = torch.randn(1, 16, 50)
    ids = torch.randint(0, 50, (1, 16))
    s = score_window(logits, logits.clone(), ids, 0)
    out = summarize([s])
    assert out["kld_mean"] == pytest.approx(0.0, abs=1e-6)
    assert out["top1"] == 1.0
    assert out["ppl"] == pytest.approx(perplexity(s.nll_base))
    assert out["n_tokens"] == 15


def test_kl_closed_form():
    p = torch.tensor([0.8, 0.2])
    q = torch.tensor([0.5, 0.5])
    base = p.log().reshape(1, 1, 2).expand(1, 2, 2)
    cand = q.log().reshape(1, 1, 2).expand(1, 2, 2)
    s = score_window(base, cand, torch.tensor([[0, 1]]), 0)
    expect = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert float(s.kld[0]) == pytest.approx(expect, rel=1e-5)


def test_uniform_perplexity_is_vocab_size():
    logits = torch.zeros(1, 10, 37)
    s = score_window(logits, None, torch.randint(0, 37, (1, 10)), 0)
    assert perplexity(s.nll_base) == pytest.approx(37.0, rel=1e-5)


def test_half_window_counts_match_llama_cpp():
    for ctx in (512, 513, 64):
        proto = EvalProtocol(ctx=ctx, scoring="half", max_tokens=None)
        logits = torch.zeros(1, ctx, 5)
        s = score_window(logits, None, torch.zeros(1, ctx, dtype=torch.long), proto.first_scored)
        assert s.nll_base.numel() == ctx - ctx // 2 - 1 == proto.scored_per_window()


def test_quantile_matches_torch():
    x = torch.rand(1001)
    assert quantile(x, 0.99) == pytest.approx(float(torch.quantile(x.double(), 0.99)))


@pytest.mark.parametrize("kwargs", [{"ctx": 2}, {"scoring": "third"}, {"ctx": 512, "max_tokens": 100},
                                    {"n_windows": 0}])
def test_protocol_validation(kwargs):
    with pytest.raises(ConfigError):
        EvalProtocol(**kwargs)


def test_protocol_round_trip():
    p = EvalProtocol(ctx=256, max_tokens=None, n_windows=3, scoring="half", data="x.txt")
    assert EvalProtocol.from_dict(p.to_dict()) == p
