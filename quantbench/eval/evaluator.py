"""Lock-step evaluation: per window, the baseline runs once and every candidate is compared
on the same tokens; logits never outlive their window. The baseline's results are cached."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from quantbench.eval.data import load_eval_text, make_windows, tokenize_for_eval
from quantbench.eval.metrics import WindowStats, perplexity, score_window, summarize
from quantbench.eval.protocol import EvalProtocol
from quantbench.progress import block_progress

log = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
ModelFactory = Callable[[], LogitsFn]


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

    def describe(self) -> str:
        return self.protocol.describe(self.n_windows, self.data_name)

    def to_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol.to_dict(), "protocol_text": self.describe(),
                "data": {"name": self.data_name, "sha256": self.data_id},
                "baseline": asdict(self.baseline),
                "results": {k: v.to_dict() for k, v in self.results.items()}}


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(
        sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _cache_key(baseline_key: str, data_id: str, tok_fp: str, protocol: EvalProtocol) -> str:
    payload = json.dumps([baseline_key, data_id, tok_fp, protocol.to_dict()], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _load_cache(cache_dir: Path | None, key: str) -> BaselineResult | None:
    if cache_dir is None:
        return None
    summary = cache_dir / f"{key}.json"
    if not summary.is_file() or not (cache_dir / f"{key}.npy").is_file():
        return None
    data = json.loads(summary.read_text())
    return BaselineResult(data["ppl"], data["n_tokens"], data["seconds"], cached=True)


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
    bos = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
    need = None if protocol.max_tokens is None and protocol.n_windows is None else (
        min(x for x in (protocol.max_tokens, (protocol.n_windows or 0) * protocol.ctx or None)
            if x))
    ids = tokenize_for_eval(tokenizer, data.text, need)
    return make_windows(ids, protocol.ctx, protocol.max_tokens, protocol.n_windows, bos), data


def _adds_bos(tokenizer) -> bool:
    if tokenizer.bos_token_id is None:
        return False
    return tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]


def evaluate(baseline: ModelFactory, candidates: dict[str, ModelFactory], tokenizer,
             protocol: EvalProtocol, baseline_key: str, cache_dir: Path | None = None,
             progress: bool = True) -> EvalReport:
    """Evaluate every candidate against the baseline on the same windows, in one pass."""
    windows, data = prepare_windows(tokenizer, protocol)
    key = _cache_key(baseline_key, data.data_id, tokenizer_fingerprint(tokenizer), protocol)
    cached = _load_cache(cache_dir, key)
    report = EvalReport(cached, {}, protocol, data.name, data.data_id, len(windows))
    if cached is not None and not candidates:
        return report
    base_fn = baseline()
    fns = {name: factory() for name, factory in candidates.items()}
    stats: dict[str, list[WindowStats]] = {name: [] for name in fns}
    base_nll: list[torch.Tensor] = []
    seconds = {name: 0.0 for name in ["baseline", *fns]}
    batches = windows.split(protocol.batch_size)
    what = f"eval {len(fns)} model(s) + baseline" if fns else "eval baseline"
    with block_progress(len(batches), f"{what}, {len(windows)} windows", progress) as advance, \
            torch.inference_mode():
        for batch in batches:
            start = time.perf_counter()
            base_logits = base_fn(batch)
            seconds["baseline"] += time.perf_counter() - start
            if not fns:
                base_nll.append(score_window(base_logits, None, batch,
                                             protocol.first_scored).nll_base)
            for name, fn in fns.items():
                start = time.perf_counter()
                cand_logits = fn(batch)
                seconds[name] += time.perf_counter() - start
                s = score_window(base_logits, cand_logits, batch, protocol.first_scored)
                stats[name].append(s)
                if len(base_nll) < len(stats[name]):
                    base_nll.append(s.nll_base)
                del cand_logits
            del base_logits
            advance("")
    nlls = torch.cat(base_nll)
    if cached is None:
        cached = BaselineResult(perplexity(nlls), int(nlls.numel()), seconds["baseline"])
        _store_cache(cache_dir, key, nlls, cached, protocol)
    report.baseline = cached
    for name in fns:
        s = summarize(stats[name])
        report.results[name] = EvalResult(
            name=name, ppl=s["ppl"], delta_ppl_pct=100.0 * (s["ppl"] / cached.ppl - 1.0),
            kld_mean=s["kld_mean"], kld_p99=s["kld_p99"], top1=s["top1"],
            n_tokens=s["n_tokens"], seconds=round(seconds[name], 3))
    return report
