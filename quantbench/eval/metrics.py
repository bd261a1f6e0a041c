"""Pure metric functions on logits: NLL, KL divergence over the full vocabulary, top-1."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class WindowStats:
    """Per scored token of one window (1-D float32 / bool tensors)."""

    nll_base: torch.Tensor
    nll_cand: torch.Tensor | None = None
    kld: torch.Tensor | None = None
    top1: torch.Tensor | None = None


def _scored(logits: torch.Tensor, first: int) -> torch.Tensor:
    """Log-probs of positions ``first .. T-2`` (those that predict a next token), float32."""
    return torch.log_softmax(logits[..., first:-1, :].float(), dim=-1).reshape(
        -1, logits.shape[-1])


def nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -logp.gather(1, targets.reshape(-1, 1)).squeeze(1)


def score_window(base_logits: torch.Tensor, cand_logits: torch.Tensor | None,
                 input_ids: torch.Tensor, first: int) -> WindowStats:
    """Compare a candidate with the baseline on the same window ``[B, T]``."""
    targets = input_ids[..., first + 1:].reshape(-1)
    base = _scored(base_logits, first)
    stats = WindowStats(nll_base=nll(base, targets))
    if cand_logits is None:
        return stats
    cand = _scored(cand_logits, first)
    stats.nll_cand = nll(cand, targets)
    stats.kld = (base.exp() * (base - cand)).sum(dim=1).clamp_min(0.0)
    stats.top1 = base.argmax(dim=1) == cand.argmax(dim=1)
    return stats


def perplexity(nlls: torch.Tensor) -> float:
    return float(torch.exp(nlls.double().mean()))


def quantile(values: torch.Tensor, q: float) -> float:
    """Exact quantile (linear interpolation) without torch.quantile's size limit."""
    ordered, _ = torch.sort(values.double().reshape(-1))
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def summarize(stats: list[WindowStats]) -> dict[str, float]:
    """ppl, KLD mean / p99, top-1 over all scored tokens of a candidate."""
    nll_c = torch.cat([s.nll_cand for s in stats])
    kld = torch.cat([s.kld for s in stats])
    top1 = torch.cat([s.top1 for s in stats])
    return {"ppl": perplexity(nll_c), "kld_mean": float(kld.double().mean()),
            "kld_p99": quantile(kld, 0.99), "top1": float(top1.double().mean()),
            "n_tokens": int(nll_c.numel())}
