"""Glue between checkpoints and the evaluator: build models from what was written."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantbench.devices import resolve_device
from quantbench.errors import EvalError, QuantbenchError
from quantbench.eval.evaluator import EvalReport, evaluate
from quantbench.eval.protocol import EvalProtocol
from quantbench.formats.base import Artifact
from quantbench.formats.io import open_artifact
from quantbench.formats.manifest import record_eval, verify_artifact
from quantbench.lazy import torch
from quantbench.models.loader import Model, load_model
from quantbench.eval.sources import artifact_factory, source_factory  # noqa: F401 (API)

if TYPE_CHECKING:
    from quantbench.eval.budget import EvalEstimate

log = logging.getLogger(__name__)


def eval_cache_dir() -> Path:
    from quantbench.models.sample import cache_root

    return cache_root() / "eval"


def _is_artifact_dir(text: str) -> bool:
    from quantbench.formats.gguf import find_gguf

    path = Path(text)  # a directory of safetensors weights (a .bin checkpoint is a source)
    return path.is_dir() and (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists()) \
        or find_gguf(path) is not None


def _refuse_non_model_dir(text: str) -> None:
    """A folder that is neither an artifact nor a checkpoint is refused saying what an artifact
    is and how to make one (not as a model source that lacks its config.json)."""
    from quantbench.localpath import not_an_artifact

    path = Path(text).expanduser()
    if path.is_dir() and not (path / "config.json").exists():
        raise EvalError(not_an_artifact(text, "eval"))


def resolve_baseline(artifact: Artifact, baseline: "Model | str | None",
                     verify: bool = True) -> Model:
    """The baseline model: ``baseline``, else the source the manifest names; a quantbench
    output used as the baseline is checked against its manifest first (``verify``)."""
    if isinstance(baseline, Model):
        return baseline
    if baseline is None:
        source = ((artifact.manifest or {}).get("source") or {}).get("id")
        if not source:
            raise QuantbenchError(
                f"{artifact.path} does not name its source model; pass --baseline SOURCE")
        baseline = source
    verify_artifact(baseline, verify)
    return load_model(baseline)


def make_protocol(protocol: EvalProtocol | None, **kwargs: Any) -> EvalProtocol:
    if protocol is not None:
        return protocol
    fields = {k: v for k, v in kwargs.items() if v is not None}
    return EvalProtocol(**fields)


def evaluate_one(target: "str | os.PathLike | Model", baseline: "Model | str | None" = None,
                 protocol: EvalProtocol | None = None, progress: bool | None = None,
                 cache_dir: Path | None = None, use_cache: bool = True,
                 device: "str | torch.device | None" = "auto", verify: bool = True,
                 stream: str = "auto", **protocol_fields: Any) -> EvalReport:
    """Evaluate an artifact against its baseline, or a source model on its own; the models
    run on ``device`` (auto: a CUDA GPU when torch sees one).

    A quantbench output (``target``, or a baseline given as a path) is checked against its
    manifest's sizes and sha256 before anything reads it (``verify=False``: skipped, with a
    warning); the result is recorded in the manifest only if its files verify. A model with
    NaN/Inf results raises ``EvalError`` naming it and the first such window. ``progress``:
    None follows ``QUANTBENCH_PROGRESS`` (shown by default), False is silent. ``stream``:
    "on" runs the models block by block (memory: one block, not the model), "off" whole,
    "auto" picks by the estimated memory (``eval/budget.py``; ``plan_eval`` shows it)."""
    dev = resolve_device(device)
    protocol = make_protocol(protocol, **protocol_fields)
    cache = (cache_dir or eval_cache_dir()) if use_cache else None
    base, artifact = _resolve(target, baseline, verify)
    if artifact is None:
        return evaluate(source_factory(base, dev), {}, base.tokenizer(), protocol,
                        baseline_key=base.fingerprint(), cache_dir=cache, progress=progress,
                        baseline_name=str(base.source), stream=stream)
    name = Path(artifact.path).name
    report = evaluate(source_factory(base, dev), {name: artifact_factory(artifact, dev)},
                      base.tokenizer(),
                      protocol, baseline_key=base.fingerprint(), cache_dir=cache,
                      progress=progress, baseline_name=str(base.source), stream=stream)
    if name in report.errors:
        raise EvalError(report.errors[name])
    if (artifact.manifest or {}).get("summary"):
        from quantbench.bits_per_weight import pick

        report.artifacts[name] = pick(artifact.manifest["summary"])
    if artifact.manifest is not None:
        record_eval(artifact.path, summary_for(report, name))
    return report


def _resolve(target: "str | os.PathLike | Model", baseline: "Model | str | None",
             verify: bool) -> tuple[Model, Artifact | None]:
    """The baseline model and the artifact evaluated against it (None: a source alone)."""
    if not isinstance(target, Model):
        verify_artifact(target, verify)
    artifact = None
    if not isinstance(target, Model) and _is_artifact_dir(str(target)):
        artifact = open_artifact(target)
    if not isinstance(target, Model) and artifact is None:
        _refuse_non_model_dir(str(target))
    if baseline is None and (artifact is None or artifact.manifest is None):
        return (target if isinstance(target, Model) else load_model(str(target))), None
    if artifact is None:
        path = target.path if isinstance(target, Model) else load_model(str(target)).path
        verify_artifact(path, verify)
        artifact = open_artifact(path)
    return resolve_baseline(artifact, baseline, verify), artifact


def plan_eval(target: "str | os.PathLike | Model", baseline: "Model | str | None" = None,
              protocol: EvalProtocol | None = None, device: "str | torch.device | None" = "auto",
              verify: bool = True, stream: str = "auto", **protocol_fields: Any
              ) -> "EvalEstimate":
    """What ``evaluate_one`` with these arguments would hold in memory, and in which mode it
    would run (``quantbench eval --plan``); tokenizes the text, runs nothing."""
    from quantbench.eval.budget import estimate
    from quantbench.eval.evaluator import chunk_rows, prepare_windows

    protocol = make_protocol(protocol, **protocol_fields)
    base, artifact = _resolve(target, baseline, verify)
    windows, _ = prepare_windows(base.tokenizer(), protocol)
    return estimate(source_factory(base, resolve_device(device)), 1 + (artifact is not None),
                    len(windows), windows.shape[1], protocol.batch_size, stream,
                    chunk_rows=chunk_rows)


def summary_for(report: EvalReport, name: str) -> dict[str, Any]:
    result = report.results[name]
    return {
        "protocol": report.protocol.to_dict(),
        "baseline_ppl": report.baseline.ppl,
        **result.to_dict(),
    }
