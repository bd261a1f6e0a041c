"""What the evaluator runs: a model's tensors and run-time semantics, built whole or streamed.

An :class:`EvalSource` is the source checkpoint (the baseline) or an artifact read back through
its format's reader (a candidate). Called, it builds the whole model in float32
(``CausalLM``); :class:`~quantbench.eval.streamed.StreamedLM` instead reads it one decoder
block at a time through ``read`` and ``runtime``. Both compute the same thing: the same
tensors, dequantized the same way, with the same run-time modules swapped in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from quantbench.formats.base import Artifact
from quantbench.lazy import torch
from quantbench.models.loader import Model
from quantbench.models.runtime import apply_runtime
from quantbench.models.torch_model import CausalLM, build_causal_lm, logits_fn

Tensors = Iterator[tuple[str, "torch.Tensor"]]


def _no_runtime(net: "torch.nn.Module", under: str) -> "torch.nn.Module":
    return net


@dataclass
class EvalSource:
    """A model as the evaluator reads it: its HF config, its tensor names, ``read(names)`` →
    ``(name, tensor)`` pairs in that order (dequantized, as a runtime sees them), and
    ``runtime(net, under)``: the run-time modules of the format swapped in below ``under``
    (all of ``net`` for ``""``)."""

    config: dict[str, Any]
    names: list[str]
    read: Callable[[Iterable[str]], Tensors]
    runtime: Callable[["torch.nn.Module", str], "torch.nn.Module"] = _no_runtime
    device: "torch.device | None" = None
    trust_remote_code: bool = False
    # numel of each tensor as stored (the memory estimate); empty where unknown
    sizes: dict[str, int] = field(default_factory=dict)

    def __call__(self) -> CausalLM:
        """The whole model, float32, on ``device``."""
        net = build_causal_lm(self.config, self.read(self.names), torch.float32,
                              self.trust_remote_code)
        return logits_fn(self.runtime(net, ""), self.device)


def source_factory(model: Model, device: "torch.device | None" = None) -> EvalSource:
    """Baseline: the source weights as stored, computed in float32 (on ``device``)."""
    names = model.weights.names()
    return EvalSource(model.config, names, model.weights.iter, device=device,
                      trust_remote_code=model.trust_remote_code,
                      sizes={n: math.prod(model.weights.shape(n)) for n in names})


def artifact_factory(artifact: Artifact, device: "torch.device | None" = None) -> EvalSource:
    """Candidate: the artifact read back through its format's reader, computed in float32 (with
    the format's run-time semantics, e.g. LLM.int8's outlier decomposition), on ``device``."""
    return EvalSource(artifact.config, artifact.tensor_names(), artifact.dequantized,
                      lambda net, under: apply_runtime(net, artifact, under), device=device)

