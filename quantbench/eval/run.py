"""Glue between checkpoints and the evaluator: build models from what was written."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from quantbench.devices import resolve_device
from quantbench.errors import EvalError, QuantbenchError
from quantbench.eval.evaluator import EvalReport, evaluate
from quantbench.eval.protocol import EvalProtocol
from quantbench.formats.base import Artifact
from quantbench.formats.io import open_artifact
from quantbench.formats.manifest import record_eval, verify_artifact
from quantbench.lazy import torch
from quantbench.models.loader import Model, load_model
from quantbench.models.runtime import apply_runtime
from quantbench.models.torch_model import build_causal_lm, logits_fn

log = logging.getLogger(__name__)


def eval_cache_dir() -> Path:
    from quantbench.models.sample import cache_root

    return cache_root() / "eval"


def source_factory(model: Model, device: "torch.device | None" = None):
    """Baseline: the source weights as stored, computed in float32 (on ``device``)."""
    def build():
        tensors = model.weights.iter(model.weights.names())
        net = build_causal_lm(model.config, tensors, torch.float32, model.trust_remote_code)
        return logits_fn(net, device)

    return build


def artifact_factory(artifact: Artifact, device: "torch.device | None" = None):
    """Candidate: the artifact read back through its format's reader, computed in float32 (with
    the format's run-time semantics, e.g. LLM.int8's outlier decomposition), on ``device``."""
    def build():
        net = build_causal_lm(artifact.config, artifact.dequantized(), torch.float32)
        return logits_fn(apply_runtime(net, artifact), device)

    return build


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
                 **protocol_fields: Any) -> EvalReport:
    """Evaluate an artifact against its baseline, or a source model on its own; the models
    run on ``device`` (auto: a CUDA GPU when torch sees one).

    A quantbench output (``target``, or a baseline given as a path) is checked against its
    manifest's sizes and sha256 before anything reads it (``verify=False``: skipped, with a
    warning); the result is recorded in the manifest only if its files verify. A model with
    NaN/Inf results raises ``EvalError`` naming it and the first such window. ``progress``:
    None follows ``QUANTBENCH_PROGRESS`` (shown by default), False is silent."""
    dev = resolve_device(device)
    protocol = make_protocol(protocol, **protocol_fields)
    cache = (cache_dir or eval_cache_dir()) if use_cache else None
    if not isinstance(target, Model):
        verify_artifact(target, verify)
    artifact = None
    if not isinstance(target, Model) and _is_artifact_dir(str(target)):
        artifact = open_artifact(target)
    if not isinstance(target, Model) and artifact is None:
        _refuse_non_model_dir(str(target))
    if baseline is None and (artifact is None or artifact.manifest is None):
        model = target if isinstance(target, Model) else load_model(str(target))
        return evaluate(source_factory(model, dev), {}, model.tokenizer(), protocol,
                        baseline_key=model.fingerprint(), cache_dir=cache, progress=progress,
                        baseline_name=str(model.source))
    if artifact is None:
        path = target.path if isinstance(target, Model) else load_model(str(target)).path
        verify_artifact(path, verify)
        artifact = open_artifact(path)
    base = resolve_baseline(artifact, baseline, verify)
    name = Path(artifact.path).name
    report = evaluate(source_factory(base, dev), {name: artifact_factory(artifact, dev)},
                      base.tokenizer(),
                      protocol, baseline_key=base.fingerprint(), cache_dir=cache,
                      progress=progress, baseline_name=str(base.source))
    if name in report.errors:
        raise EvalError(report.errors[name])
    if (artifact.manifest or {}).get("summary"):
        from quantbench.bits_per_weight import pick

        report.artifacts[name] = pick(artifact.manifest["summary"])
    if artifact.manifest is not None:
        record_eval(artifact.path, summary_for(report, name))
    return report


def summary_for(report: EvalReport, name: str) -> dict[str, Any]:
    result = report.results[name]
    return {
        "protocol": report.protocol.to_dict(),
        "baseline_ppl": report.baseline.ppl,
        **result.to_dict(),
    }
