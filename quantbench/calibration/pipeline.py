"""The sequential block pipeline every data-driven method runs on.

Capture the inputs of block 0 (hidden states plus the keyword arguments the model passes to its
layers: attention mask, position ids and embeddings) with a forward pre-hook; then, block by
block: load the block's weights lazily, and for each true-sequential group of linears run the
block over the calibration windows with hooks that feed the method's collectors, quantize the
group and put the dequantized weights back, so later groups see quantized inputs; finally run the
quantized block to make the next block's inputs, and free it. Peak memory: one block plus the
calibration activations.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from quantbench.calibration.collectors import COLLECTORS
from quantbench.models.loader import Model
from quantbench.models.torch_model import _no_init

log = logging.getLogger(__name__)

# quantize_fn(weight name, weight, statistic) -> QuantizedTensor
QuantizeFn = Callable[[str, torch.Tensor, torch.Tensor], Any]


@dataclass
class Captured:
    hidden: list[torch.Tensor]        # one [B, L, H] tensor per micro-batch
    kwargs: list[dict[str, Any]]      # the layer kwargs of each micro-batch


def _skeleton(model: Model) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in model.config.items() if k != "quantization_config"}
    hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"), _no_init():
        net = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    return net


def _set(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def materialize_block(skeleton: torch.nn.Module, model: Model, index: int) -> torch.nn.Module:
    """Decoder block ``index`` on CPU in float32 with its weights read lazily from disk."""
    layer = skeleton.get_submodule(f"{model.arch.block_prefix}.{index}")
    layer = layer.to_empty(device="cpu")
    prefix = f"{model.arch.block_prefix}.{index}."
    state = {n[len(prefix):]: t.float() for n, t in model.weights.iter(
        model.block_tensor_names(index))}
    layer.load_state_dict(state, strict=True)
    return layer.eval()


def capture_inputs(model: Model, skeleton: torch.nn.Module, windows: torch.Tensor,
                   batch_size: int) -> Captured:
    """Run embeddings (+ rotary) and block 0 once per micro-batch; a pre-hook records what
    block 0 receives. Later blocks are never run here."""
    arch = model.arch
    embed = skeleton.get_submodule(arch.embed).to_empty(device="cpu")
    embed.weight.data.copy_(model.weights.get(f"{arch.embed}.weight").float())
    rotary_cls = type(skeleton.get_submodule(arch.rotary))
    _set(skeleton, arch.rotary, rotary_cls(config=skeleton.config))
    base = skeleton.get_submodule(arch.base_model)
    layers = skeleton.get_submodule(arch.block_prefix)
    first = materialize_block(skeleton, model, 0)
    captured = Captured([], [])

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach())
        captured.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    _set(skeleton, arch.block_prefix, torch.nn.ModuleList([first]))
    _set(skeleton, arch.final_norm, torch.nn.Identity())
    try:
        with torch.inference_mode():
            for batch in windows.split(batch_size):
                base(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
        _set(skeleton, arch.block_prefix, layers)
    return captured


def _run(layer: torch.nn.Module, captured: Captured) -> list[torch.Tensor]:
    outs = []
    with torch.inference_mode():
        for hidden, kwargs in zip(captured.hidden, captured.kwargs):
            out = layer(hidden, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def quantize_block(model: Model, layer: torch.nn.Module, index: int, captured: Captured,
                   targets: set[str], statistic: str, quantize_fn: QuantizeFn) -> dict[str, Any]:
    """True-sequential quantization of one block's targets; returns name → QuantizedTensor."""
    results: dict[str, Any] = {}
    for group in model.arch.sequential_groups:
        names = {lin: f"{model.arch.block_module(index, lin)}.weight" for lin in group}
        names = {lin: n for lin, n in names.items() if n in targets}
        if not names:
            continue
        collectors, handles = {}, []
        for lin in names:
            module = layer.get_submodule(lin)
            collectors[lin] = COLLECTORS[statistic](module.in_features)
            handles.append(module.register_forward_hook(
                lambda mod, inp, out, c=collectors[lin]: c.add(inp[0])))
        try:
            _run(layer, captured)
        finally:
            for h in handles:
                h.remove()
        for lin, name in names.items():
            module = layer.get_submodule(lin)
            source = model.weights.get(name)
            qt = quantize_fn(name, source, collectors[lin].result())
            results[name] = qt
            module.weight.data.copy_(qt.dequantize())
    return results


def run_pipeline(model: Model, windows: torch.Tensor, targets: set[str], statistic: str,
                 quantize_fn: QuantizeFn, batch_size: int = 8
                 ) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(block index, {tensor name: QuantizedTensor or source tensor})`` in order."""
    skeleton = _skeleton(model)
    captured = capture_inputs(model, skeleton, windows, batch_size)
    for index in range(model.num_blocks):
        layer = materialize_block(skeleton, model, index)
        quantized = quantize_block(model, layer, index, captured, targets, statistic,
                                   quantize_fn)
        captured.hidden = _run(layer, captured)
        tensors = {n: quantized.get(n, model.weights.get(n))
                   for n in model.block_tensor_names(index)}
        layer.to("meta")  # release the block's memory
        yield index, tensors
