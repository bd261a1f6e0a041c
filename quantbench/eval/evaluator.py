"""Lock-step evaluation: per window, the baseline runs once and every candidate is compared
on the same tokens; the vocabulary head runs a chunk of positions at a time (``LOGITS_BYTES``),
so no model ever holds a whole window's full-vocabulary logits. The baseline's per-token losses
are cached (one float per scored token)."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from quantbench.errors import EvalError, QuantbenchError
from quantbench.eval.budget import choose
from quantbench.eval.data import adds_bos, load_eval_text, make_windows, tokenize_for_eval
from quantbench.eval.metrics import (WindowStats, concat, log_probs, non_finite_window,
                                     perplexity, score_rows, summarize, to_cpu)
from quantbench.eval.protocol import EvalProtocol
from quantbench.jsonfile import dumps, non_finite
from quantbench.lazy import numpy as np, torch
from quantbench.models.torch_model import CausalLM
from quantbench.progress import block_progress

log = logging.getLogger(__name__)

# A model as the evaluator runs it: a ``CausalLM`` (body, then its head a chunk at a time), or
# any ``input_ids -> logits [B, T, V]`` callable (scripted models; its logits exist whole).
LogitsFn = Callable[["torch.Tensor"], "torch.Tensor"]
ModelFactory = Callable[[], "CausalLM | LogitsFn"]

LOGITS_BYTES = 64 * 2**20
"""Bytes of float32 full-vocabulary logits one model's head makes at once: the positions of a
batch are scored this many bytes' worth at a time (a 262,144-token vocabulary: 64 positions;
a 32k one: 512). Scoring a chunk holds a few buffers of that size (the baseline's and one
candidate's log-probabilities, the KL terms). ``QUANTBENCH_LOGITS_MB`` overrides it (less
memory, more head calls)."""


@dataclass
class EvalResult:
    name: str
    ppl: float
    delta_ppl_pct: float
    kld_mean: float
    kld_p99: float
    top1: float
    n_tokens: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BaselineResult:
    ppl: float
    n_tokens: int
    seconds: float
    cached: bool = False


@dataclass
class EvalReport:
    baseline: BaselineResult
    results: dict[str, EvalResult]
    protocol: EvalProtocol
    data_name: str
    data_id: str
    n_windows: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # candidate → why it has no result
    # candidate → both bits per weight of its artifact (quantbench/bits_per_weight.py)
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    mode: str = "whole"  # how the models ran: whole, or block-streamed (eval/streamed.py)

    def describe(self) -> str:
        return self.protocol.describe(self.n_windows, self.data_name)

    def to_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol.to_dict(), "protocol_text": self.describe(),
                "data": {"name": self.data_name, "sha256": self.data_id},
                "mode": self.mode, "baseline": asdict(self.baseline),
                "results": {k: v.to_dict() for k, v in self.results.items()},
                **({"errors": dict(self.errors)} if self.errors else {}),
                **({"artifacts": dict(self.artifacts)} if self.artifacts else {})}


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else dumps(
        sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _cache_key(baseline_key: str, data_id: str, tok_fp: str, protocol: EvalProtocol) -> str:
    # half scoring cuts BOS windows as llama.cpp does (issue 22): older baselines not reused
    windowing = ["bos-overwrites-first"] if protocol.scoring == "half" else []
    payload = dumps([baseline_key, data_id, tok_fp, protocol.to_dict(), *windowing],
                    sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _load_cache(cache_dir: Path | None, key: str) -> BaselineResult | None:
    """The cached baseline, if there is one that can be trusted: a summary that does not parse,
    or values that are not finite (written before NaN was refused), is discarded (removed, so
    the baseline is computed again), never used."""
    if cache_dir is None:
        return None
    summary, values = cache_dir / f"{key}.json", cache_dir / f"{key}.npy"
    if not summary.is_file() or not values.is_file():
        return None
    try:
        data = json.loads(summary.read_text())
        result = BaselineResult(float(data["ppl"]), int(data["n_tokens"]),
                                float(data["seconds"]), cached=True)
        finite = math.isfinite(result.ppl) and result.ppl > 0 and \
            bool(np.isfinite(np.load(values)).all())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        finite, why = False, f"unreadable ({type(exc).__name__}: {exc})"
    else:
        why = "holds non-finite values"
    if finite:
        return result
    log.warning("cached baseline %s %s; discarded, computing it again", summary, why)
    summary.unlink(missing_ok=True)
    values.unlink(missing_ok=True)
    return None


def _store_cache(cache_dir: Path | None, key: str, nlls: torch.Tensor, result: BaselineResult,
                 protocol: EvalProtocol) -> None:
    """Keep the baseline's per-token losses for the next evaluation. Each file gets a
    temporary name of its own (two evaluations of one source may finish at once) that the next
    write removes when a kill left it; a cache that cannot be written (disk full, no
    permission) costs the next run a baseline pass, not this run its result."""
    if cache_dir is None:
        return
    from quantbench.errors import QuantbenchError
    from quantbench.formats.manifest import atomic_write, write_json_atomic

    try:
        with atomic_write(cache_dir / f"{key}.npy") as fh:
            np.save(fh, nlls.numpy().astype(np.float32))
        write_json_atomic(cache_dir / f"{key}.json", {**asdict(result), "cached": False,
                                                      "protocol": protocol.to_dict(),
                                                      "created": time.time()})
    except QuantbenchError as exc:
        log.warning("baseline not cached: %s", exc)


def prepare_windows(tokenizer, protocol: EvalProtocol) -> tuple[torch.Tensor, Any]:
    data = load_eval_text(protocol.data)
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    need = None if protocol.max_tokens is None and protocol.n_windows is None else (
        min(x for x in (protocol.max_tokens, (protocol.n_windows or 0) * protocol.ctx or None)
            if x))
    ids = tokenize_for_eval(tokenizer, data.text, need)
    return make_windows(ids, protocol.ctx, protocol.max_tokens, protocol.n_windows, bos,
                        llama_cpp=protocol.scoring == "half"), data


def evaluate(baseline: ModelFactory, candidates: dict[str, ModelFactory], tokenizer,
             protocol: EvalProtocol, baseline_key: str, cache_dir: Path | None = None,
             progress: bool | None = None, baseline_name: str = "the baseline",
             stream: "str | bool" = "auto", spill: "bool | Path | None" = None) -> EvalReport:
    """Evaluate every candidate against the baseline on the same windows, in one pass.

    ``stream`` ("auto", "on", "off" or a bool; ``eval/budget.py`` decides "auto" by the
    estimated memory): each model runs block by block over all windows (``eval/streamed.py``;
    the models must be ``EvalSource`` s), the candidates one after another against the
    baseline's kept final hidden states, its head recomputed per chunk; the hidden states
    spill to a temporary file when they do not fit (``spill``: True or a folder forces it).
    Otherwise every model is built whole and the windows run through all of them a batch at
    a time. Both give the same results.

    No NaN or infinity is ever a result: a baseline with non-finite log-probabilities (or
    perplexity) on some window raises ``EvalError`` naming it and the first such window; a
    candidate with non-finite log-probabilities, perplexity or KLD gets that error in
    ``report.errors`` instead of a result (and is not run on the remaining windows), so the
    others still get theirs."""
    windows, data = prepare_windows(tokenizer, protocol)
    key = _cache_key(baseline_key, data.data_id, tokenizer_fingerprint(tokenizer), protocol)
    cached = _load_cache(cache_dir, key)
    report = EvalReport(cached, {}, protocol, data.name, data.data_id, len(windows))
    if cached is not None and not candidates:
        return report
    span = _WindowSpan(windows.shape[1] - (1 if adds_bos(tokenizer) else 0), data.name)
    tally = _Tally(report, span, baseline_name, {name: [] for name in candidates}, [],
                   {name: 0.0 for name in ["baseline", *candidates]})
    plan = choose(baseline, 1 + len(candidates), windows, protocol.batch_size, stream,
                  chunk_rows)
    streamed = plan is not None and plan.mode == "streamed"
    if streamed and spill is None:
        spill = plan.spill
    run = _run_streamed if streamed else _run_whole
    run(baseline, candidates, windows, protocol, tally, progress, cached is None, spill)
    if cached is None:
        nlls = torch.cat(tally.base_nll)
        cached = BaselineResult(perplexity(nlls), int(nlls.numel()), tally.seconds["baseline"])
        _store_cache(cache_dir, key, nlls, cached, protocol)
    report.baseline = cached
    report.mode = "streamed" if streamed else "whole"
    for name in candidates:
        if name not in report.errors:
            _add_result(report, name, summarize(tally.stats[name]),
                        round(tally.seconds[name], 3))
    return report


@dataclass
class _Tally:
    """What the scoring passes gather: each candidate's stats, the baseline's per-token
    losses, each model's seconds; non-finite windows become errors as they are met."""

    report: EvalReport
    span: "_WindowSpan"
    baseline_name: str
    stats: dict[str, list[WindowStats]]
    base_nll: list[torch.Tensor]
    seconds: dict[str, float]

    def add(self, first_window: int, count: int, nll_base: torch.Tensor | None,
            scored: dict[str, WindowStats], live: dict[str, Any]) -> None:
        """One batch of ``count`` windows: the baseline's losses (``None``: not needed in
        this pass) and each candidate's stats, checked; a candidate with a non-finite window
        gets its error and leaves ``live``."""
        if nll_base is not None:
            problem = non_finite_window(WindowStats(nll_base), count, candidate=False)
            if problem is not None:
                raise EvalError(self.span.baseline_message(self.baseline_name, first_window,
                                                           *problem))
            self.base_nll.append(nll_base)
        for name, s in scored.items():
            problem = non_finite_window(s, count, candidate=True)
            if problem is None:
                self.stats[name].append(s)
                continue
            self.report.errors[name] = self.span.candidate_message(name, first_window, *problem)
            del live[name]  # the caller reports it (one line), the others go on


def _run_whole(baseline: ModelFactory, candidates: dict[str, ModelFactory],
               windows: torch.Tensor, protocol: EvalProtocol, tally: _Tally,
               progress: bool | None, need_base: bool, spill: "bool | Path") -> None:
    """Every model built whole; each batch of windows through all of them, then scored."""
    base_fn = baseline()
    fns: dict[str, "CausalLM | LogitsFn"] = {}
    for name, factory in candidates.items():
        try:  # a candidate that cannot be built (a damaged or non-finite tensor) is its error
            fns[name] = factory()
        except QuantbenchError as exc:
            tally.report.errors[name] = f"{name}: {exc}"
    if candidates and not fns:  # nothing left to compare with the baseline: say so now
        raise EvalError(next(iter(tally.report.errors.values())))
    first = protocol.first_scored
    what = (f"eval {len(fns)} model{'s' if len(fns) > 1 else ''} + baseline" if fns
            else "eval baseline")
    with block_progress(len(windows), what, progress, unit="windows") as advance, \
            torch.inference_mode():
        for index, batch in enumerate(windows.split(protocol.batch_size)):
            base = _body(base_fn, batch, first, "baseline", tally.seconds)
            passes = {name: _body(fn, batch, first, name, tally.seconds)
                      for name, fn in fns.items()}
            nll_base, scored = _score(base, passes, batch[:, first + 1:].reshape(-1),
                                      tally.seconds)
            tally.add(index * protocol.batch_size, len(batch), nll_base, scored, fns)
            advance("", len(batch))
            if candidates and not fns and not need_base:
                break  # every candidate failed and the baseline's result is cached


def _run_streamed(baseline: ModelFactory, candidates: dict[str, ModelFactory],
                  windows: torch.Tensor, protocol: EvalProtocol, tally: _Tally,
                  progress: bool | None, need_base: bool, spill: "bool | Path") -> None:
    """The baseline streamed once and kept (final hidden states + head); then each candidate
    streamed and scored against it, one at a time (its head beside the baseline's)."""
    from quantbench.eval.streamed import Stores, StreamedLM

    stores = Stores(spill)
    built: list[str] = []
    base = None
    try:
        base = _streamed(StreamedLM(baseline), "baseline", windows, protocol, stores, tally,
                         progress)
        if not candidates:
            _score_streamed(base, None, windows, protocol, tally, progress, need_base)
        for name, source in candidates.items():
            try:
                lm = _streamed(StreamedLM(source), name, windows, protocol, stores, tally,
                               progress)
            except QuantbenchError as exc:  # damaged or non-finite tensors: its error
                tally.report.errors[name] = f"{name}: {exc}"
                continue
            built.append(name)
            try:
                _score_streamed(base, (name, lm), windows, protocol, tally, progress, need_base)
            finally:
                lm.close()
            need_base = False
        if candidates and not built:
            raise EvalError(next(iter(tally.report.errors.values())))
    finally:
        if base is not None:
            base.close()
        stores.close()


def _streamed(lm: "StreamedLM", name: str, windows: torch.Tensor, protocol: EvalProtocol,
              stores: "Stores", tally: _Tally, progress: bool | None) -> "StreamedLM":
    from quantbench.eval.streamed import timed_run

    blocks = len(lm.skeleton.get_submodule(lm.arch.block_prefix))
    with block_progress(blocks + 1, f"eval {name}", progress, unit="blocks") as advance:
        try:
            timed_run(lm, windows, protocol.batch_size, stores, advance,
                      tally.seconds, name)
        except BaseException:
            lm.close()
            raise
    return lm


def _score_streamed(base: "StreamedLM", candidate: "tuple[str, StreamedLM] | None",
                    windows: torch.Tensor, protocol: EvalProtocol, tally: _Tally,
                    progress: bool | None, need_base: bool) -> None:
    """Score one candidate (or none: the baseline alone) over every window against the
    baseline's final hidden states; the baseline's losses are gathered when ``need_base``
    (on to the last window even when the candidate fails on the way)."""
    live = {} if candidate is None else {candidate[0]: candidate[1]}
    first, size = protocol.first_scored, protocol.batch_size

    def rows(name: str, lm: "StreamedLM", start: int, count: int) -> _Pass:
        hidden = _timed(tally.seconds, name, lm.rows, start, count, first)
        return _Pass(hidden, lm.head, lm.vocab_size)

    what = f"score {candidate[0]}" if candidate else "score baseline"
    with block_progress(len(windows), what, progress, unit="windows") as advance:
        for start in range(0, len(windows), size):
            if not live and not need_base:
                return
            count = min(size, len(windows) - start)
            passes = {name: rows(name, lm, start, count) for name, lm in live.items()}
            targets = windows[start:start + count, first + 1:].reshape(-1)
            nll_base, scored = _score(rows("baseline", base, start, count), passes, targets,
                                      tally.seconds)
            tally.add(start, count, nll_base if need_base else None, scored, live)
            advance("", count)


def chunk_rows(vocab_size: int) -> int:
    """Positions whose logits fit in ``LOGITS_BYTES`` (or ``QUANTBENCH_LOGITS_MB`` MiB when
    set: less memory, more head calls; at least one position)."""
    import os

    limit = LOGITS_BYTES
    text = os.environ.get("QUANTBENCH_LOGITS_MB", "").strip()
    if text:
        try:
            limit = int(float(text) * 2**20)
        except ValueError:
            raise EvalError(f"QUANTBENCH_LOGITS_MB must be a number of MiB, got {text!r}") \
                from None
    return max(1, limit // (4 * vocab_size))


@dataclass
class _Pass:
    """One model's pass over a batch up to its head: the hidden states of the scored positions
    ``[N, H]`` (windows in order) and the head that makes their logits."""

    rows: "torch.Tensor"
    head: Callable[["torch.Tensor"], "torch.Tensor"]
    vocab_size: int


def _timed(seconds: dict[str, float], name: str, run: Callable, *args):
    """``run(*args)``, its time added to ``seconds[name]`` (a GPU's queued work waited for)."""
    start = time.perf_counter()
    out = run(*args)
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    seconds[name] += time.perf_counter() - start
    return out


def _body(fn: "CausalLM | LogitsFn", batch: torch.Tensor, first: int, name: str,
          seconds: dict[str, float]) -> _Pass:
    if isinstance(fn, CausalLM):
        hidden, head, vocab = _timed(seconds, name, fn.hidden, batch), fn.head, fn.vocab_size
    else:  # logits made whole: they stand for the hidden states, the head is the identity
        hidden = _timed(seconds, name, fn, batch)
        head, vocab = (lambda rows: rows.float()), hidden.shape[-1]
    return _Pass(hidden[:, first:-1].reshape(-1, hidden.shape[-1]), head, vocab)


def _score(base: _Pass, passes: dict[str, _Pass], targets: torch.Tensor,
           seconds: dict[str, float]) -> tuple[torch.Tensor, dict[str, WindowStats]]:
    """One batch of windows, every model's body already run: ``chunk_rows`` positions at a
    time, the baseline's head once and each candidate's head compared with it (a chunk's
    logits never outlive it: at most the baseline's and one candidate's exist at once);
    returns the baseline's NLL and each candidate's stats (on the CPU, windows in order), and
    adds the heads' time to ``seconds``."""
    step = chunk_rows(base.vocab_size)
    base_parts: list[WindowStats] = []
    parts: dict[str, list[WindowStats]] = {name: [] for name in passes}
    with torch.inference_mode():
        for start in range(0, len(targets), step):
            rows = slice(start, start + step)
            base_logp = log_probs(_timed(seconds, "baseline", base.head, base.rows[rows]))
            chunk_targets = targets[rows].to(base_logp.device)
            base_parts.append(to_cpu(score_rows(base_logp, None, chunk_targets)))
            for name, model in passes.items():
                cand_logp = log_probs(_timed(seconds, name, model.head, model.rows[rows]))
                parts[name].append(to_cpu(score_rows(base_logp, cand_logp, chunk_targets)))
                del cand_logp
            del base_logp
    return concat(base_parts).nll_base, {name: concat(p) for name, p in parts.items()}


def _add_result(report: EvalReport, name: str, s: dict[str, Any], seconds: float) -> None:
    """The candidate's result, or — when a total overflows although every window was finite
    (a perplexity near the largest double, Δppl % beyond it) — its error."""
    result = EvalResult(
        name=name, ppl=s["ppl"], delta_ppl_pct=100.0 * (s["ppl"] / report.baseline.ppl - 1.0),
        kld_mean=s["kld_mean"], kld_p99=s["kld_p99"], top1=s["top1"], n_tokens=s["n_tokens"],
        seconds=seconds)
    overflow = next(non_finite(result.to_dict()), None)
    if overflow is None:
        report.results[name] = result
    else:
        report.errors[name] = (f"{name}: its {overflow[0]} overflows ({overflow[1]}) over finite "
                               "windows, so it has no valid result: re-convert it")


@dataclass(frozen=True)
class _WindowSpan:
    """Where a window lies in the evaluation text, for messages that name it."""

    step: int  # text tokens per window (a window's BOS is not one of them)
    data_name: str

    def describe(self, window: int) -> str:
        first = window * self.step
        return f"window {window} (tokens {first}–{first + self.step - 1} of {self.data_name})"

    def baseline_message(self, name: str, first_window: int, row: int, what: str) -> str:
        return (f"baseline {name}: {what} in {self.describe(first_window + row)}; its weights "
                "hold NaN/Inf values or overflow float32, so there is nothing to compare "
                "against: check the source model")

    def candidate_message(self, name: str, first_window: int, row: int, what: str) -> str:
        return (f"{name}: {what} in {self.describe(first_window + row)}; its weights or "
                "scales hold NaN/Inf values or overflow float32, so it has no valid result: "
                "re-convert it")
