"""Pure metric functions on logits: NLL, KL divergence over the full vocabulary, top-1."""
from __future__ import annotations

from dataclasses import dataclass

from quantbench.lazy import torch


@dataclass
class WindowStats:
    """Per scored token of one window (1-D float32 / bool tensors)."""

    nll_base: torch.Tensor
    nll_cand: torch.Tensor | None = None
    kld: torch.Tensor | None = None
    top1: torch.Tensor | None = None


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Logits ``[n, V]`` → float32 log-probabilities ``[n, V]``."""
    return torch.log_softmax(logits.float(), dim=-1)


def _scored(logits: torch.Tensor, first: int) -> torch.Tensor:
    """Log-probs of positions ``first .. T-2`` (those that predict a next token), float32."""
    return log_probs(logits[..., first:-1, :].reshape(-1, logits.shape[-1]))


def nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -logp.gather(1, targets.reshape(-1, 1)).squeeze(1)


def score_rows(base: torch.Tensor, cand: torch.Tensor | None,
               targets: torch.Tensor) -> WindowStats:
    """Compare a candidate's log-probabilities ``[n, V]`` with the baseline's on the same
    ``n`` scored positions (each row predicts its ``targets`` entry); every statistic of a row
    depends on that row alone, so the evaluator scores a window a few rows at a time."""
    stats = WindowStats(nll_base=nll(base, targets))
    if cand is None:
        return stats
    stats.nll_cand = nll(cand, targets)
    stats.kld = (base.exp() * (base - cand)).sum(dim=1).clamp_min(0.0)
    stats.top1 = (base.argmax(dim=1) == cand.argmax(dim=1)) & finite_rows(base) & \
        finite_rows(cand)  # argmax over NaN is NaN's position: no agreement there
    return stats


def score_window(base_logits: torch.Tensor, cand_logits: torch.Tensor | None,
                 input_ids: torch.Tensor, first: int) -> WindowStats:
    """Compare a candidate with the baseline on the same window ``[B, T]``, whole."""
    targets = input_ids[..., first + 1:].reshape(-1)
    return score_rows(_scored(base_logits, first),
                      None if cand_logits is None else _scored(cand_logits, first), targets)


def concat(parts: list[WindowStats]) -> WindowStats:
    """The stats of consecutive rows, joined (a window scored in chunks)."""
    def cat(values: list) -> torch.Tensor | None:
        return None if values[0] is None else torch.cat(values)
    return WindowStats(cat([p.nll_base for p in parts]), cat([p.nll_cand for p in parts]),
                       cat([p.kld for p in parts]), cat([p.top1 for p in parts]))


def to_cpu(stats: WindowStats) -> WindowStats:
    """The stats moved to the CPU (scored where the logits are, kept with the results)."""
    def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.cpu()
    return WindowStats(cpu(stats.nll_base), cpu(stats.nll_cand), cpu(stats.kld), cpu(stats.top1))


def finite_rows(logp: torch.Tensor) -> torch.Tensor:
    """Per position: all of its log-probabilities are finite (a NaN or Inf logit makes its whole
    log-softmax row non-finite; finite logits never do)."""
    return torch.isfinite(logp).all(dim=-1)


def _first_bad_row(values: torch.Tensor) -> tuple[int, str] | None:
    """``[windows, n]`` → the first row holding a NaN or an infinity, and which."""
    finite = torch.isfinite(values).all(dim=1)
    if bool(finite.all()):
        return None
    row = int((~finite).nonzero()[0])
    return row, "NaN" if bool(torch.isnan(values[row]).any()) else "infinite"


def non_finite_window(stats: WindowStats, windows: int,
                      candidate: bool) -> tuple[int, str] | None:
    """The first of the ``windows`` windows scored in ``stats`` (a batch, rows in order) whose
    values are not all finite, and what is wrong there: NaN/infinite log-probabilities, a window
    perplexity that overflows, a NaN/infinite KL divergence — the candidate's (``candidate``)
    or the baseline's. None when all are finite: then so are the totals (a mean of windows is
    at most the largest window's)."""
    nll_values = stats.nll_cand if candidate else stats.nll_base
    nll = nll_values.reshape(windows, -1)
    found = []
    bad = _first_bad_row(nll)
    if bad is not None:
        found.append((bad[0], f"{bad[1]} log-probabilities"))
    overflow = ~torch.isfinite(torch.exp(nll.double().mean(dim=1)))
    if bool(overflow.any()):
        found.append((int(overflow.nonzero()[0]), "a perplexity that overflows"))
    if candidate:
        bad = _first_bad_row(stats.kld.reshape(windows, -1))
        if bad is not None:
            found.append((bad[0], f"{bad[1]} KL divergence"))
    return min(found, key=lambda item: item[0]) if found else None


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
