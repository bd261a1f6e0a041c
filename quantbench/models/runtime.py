"""Run-time semantics a checkpoint carries beyond its weights, applied to the evaluator's model
so that what we measure is what the runtime computes (LLM.int8's mixed-precision matmul)."""
from __future__ import annotations

from typing import Any

from quantbench.lazy import torch
from quantbench.quant import bnb
from quantbench.quant.gguf.activations import fake_quantize


class Int8MixedLinear(torch.nn.Module):
    """A linear layer computed the way bitsandbytes' ``Linear8bitLt`` does for inference:
    int8 × int8 with activation outlier columns (``|x| ≥ threshold``) in 16-bit."""

    def __init__(self, cb: torch.Tensor, scb: torch.Tensor, threshold: float,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("cb", cb)
        self.register_buffer("scb", scb)
        self.register_buffer("cb_float", cb.float())  # the int8 product is taken in float32
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.threshold = threshold
        self.out_features, self.in_features = cb.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bnb.int8_mixed_linear(x, self.cb, self.scb, self.threshold, self.bias,
                                     self.cb_float)


class ActivationRoundingLinear(torch.nn.Module):
    """A linear layer whose input is first rounded as llama.cpp's matmul rounds it (Q8_0/Q8_K
    blocks, fp16) for the weight's GGUF type."""

    def __init__(self, linear: torch.nn.Linear, act_type: str):
        super().__init__()
        self.linear, self.act_type = linear, act_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(fake_quantize(x, self.act_type))


def _swap(net: torch.nn.Module, path: str, make) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = net.get_submodule(parent_path) if parent_path else net
    setattr(parent, child, make(getattr(parent, child)))


def _within(path: str, under: str) -> bool:
    return not under or path == under or path.startswith(under + ".")


def apply_runtime(net: torch.nn.Module, artifact: Any, under: str = "") -> torch.nn.Module:
    """Swap in run-time modules for the artifact's quantized linears where its format computes
    differently from ``x @ dequantize(W)ᵀ``: LLM.int8 in ``bitsandbytes`` files, llama.cpp's
    activation rounding in ``gguf`` files (``runtime["gguf_activations"]``: module → type).
    ``under``: only the modules at or below that path (the block or head the streamed
    evaluator has just materialized inside ``net``)."""
    for path, act_type in artifact.runtime.get("gguf_activations", {}).items():
        if _within(path, under):
            _swap(net, path, lambda old, t=act_type: ActivationRoundingLinear(old, t))
    threshold = artifact.runtime.get("llm_int8_threshold")
    if threshold is None:
        return net
    for name in artifact.quantized_names:
        if not _within(name[: -len(".weight")], under):
            continue
        qt = artifact.quantized(name)
        if qt.grid.kind != "int8_row":
            continue
        path = name[: -len(".weight")]
        parent_path, _, child = path.rpartition(".")
        parent = net.get_submodule(parent_path)
        old = getattr(parent, child)
        bias = None if old.bias is None else old.bias.detach()
        setattr(parent, child, Int8MixedLinear(qt.int8_codes(), qt.scales.reshape(-1).float(),
                                               float(threshold), bias))
    return net
