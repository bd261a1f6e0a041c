"""The sequential block pipeline every data-driven method runs on.

Capture the inputs of block 0 (hidden states plus the keyword arguments the model passes to its
layers: attention mask, position ids and embeddings) with a forward pre-hook; then, block by
block: load the block's weights lazily, and for each true-sequential group of linears run the
block over the calibration windows with hooks that feed the method's collectors, quantize the
group and put the dequantized weights back, so later groups see quantized inputs; finally run the
quantized block to make the next block's inputs, and free it. Peak memory: one block plus the
calibration activations. On a CUDA device the block, its calibration activations and the
method's maths live on the GPU; what a block yields is always on the CPU.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch

from quantbench.calibration.attention import HeadHessians
from quantbench.calibration.collectors import COLLECTORS
from quantbench.calibration.memory import heap_for_temporaries, pin_mmap_threshold
from quantbench.devices import CPU
from quantbench.models.arch import Sublayer
from quantbench.models.loader import Model
from quantbench.models.torch_model import _no_init

if TYPE_CHECKING:
    from quantbench.quant.methods.base import Method

log = logging.getLogger(__name__)

# quantize_fn(weight name, weight, statistic or None) -> QuantizedTensor
QuantizeFn = Callable[[str, torch.Tensor, Any], Any]
QuantizeManyFn = Callable[[list[str], list[torch.Tensor], Any], "list[Any] | None"]


@dataclass
class Captured:
    """Calibration inputs of the blocks: block 0's hidden states and every block's own layer
    arguments (attention mask, position embeddings, ...), as the model's forward makes them.
    Layers of one attention kind share the same tensors; a model whose layers alternate
    sliding-window and global attention (or RoPE bases) gives each layer its own."""

    hidden: list[torch.Tensor]              # one [B, L, H] tensor per micro-batch
    layer_kwargs: list[list[dict[str, Any]]]  # per block: the kwargs of each micro-batch

    @property
    def kwargs(self) -> list[dict[str, Any]]:
        """Block 0's layer arguments (one dict per micro-batch)."""
        return self.layer_kwargs[0]

    def first(self, n: int) -> "Captured":
        """The micro-batches holding the first ``n`` windows (whole micro-batches)."""
        count = 0
        for i, h in enumerate(self.hidden):
            count += h.shape[0]
            if count >= n:
                return Captured(self.hidden[:i + 1], [kw[:i + 1] for kw in self.layer_kwargs])
        return self


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


def materialize_block(skeleton: torch.nn.Module, model: Model, index: int,
                      device: torch.device = CPU) -> torch.nn.Module:
    """Decoder block ``index`` on ``device`` in float32 with its weights read lazily from disk."""
    layer = skeleton.get_submodule(f"{model.arch.block_prefix}.{index}")
    layer = layer.to_empty(device=device)
    prefix = f"{model.arch.block_prefix}.{index}."
    state = {n[len(prefix):]: t.float() for n, t in model.weights.iter(
        model.block_tensor_names(index))}
    layer.load_state_dict(state, strict=True)
    return layer.eval()


class _ArgumentTap(torch.nn.Module):
    """Stands in for decoder layer ``index`` while the inputs are captured: records the hidden
    state (block 0 only) and the keyword arguments the model passes to this layer, and returns
    the hidden state unchanged (no block runs)."""

    def __init__(self, layer: torch.nn.Module, index: int, captured: Captured):
        super().__init__()
        self.index, self.captured = index, captured
        for attr in ("attention_type", "layer_idx", "is_sliding"):  # what a forward may read
            if attr in layer.__dict__:
                self.__dict__[attr] = layer.__dict__[attr]

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.index == 0:
            self.captured.hidden.append(hidden.detach())
        self.captured.layer_kwargs[self.index].append(
            {k: v for k, v in kwargs.items() if k != "hidden_states"})
        return hidden


def capture_inputs(model: Model, skeleton: torch.nn.Module, windows: torch.Tensor,
                   batch_size: int, device: torch.device = CPU) -> Captured:
    """Run the model's forward once per micro-batch with every decoder layer replaced by a tap:
    the embeddings (+ rotary) run, the model makes each layer's arguments (its own mask and
    position embeddings), the taps record them and block 0's input. No block is run."""
    arch = model.arch
    embed = skeleton.get_submodule(arch.embed).to_empty(device=device)
    if embed._non_persistent_buffers_set:  # e.g. Gemma's embedding scale √hidden: not on disk
        skeleton._init_weights(embed)
    embed.weight.data.copy_(model.weights.get(f"{arch.embed}.weight").float())
    rotary_cls = type(skeleton.get_submodule(arch.rotary))
    _set(skeleton, arch.rotary, rotary_cls(config=skeleton.config).to(device))
    base = skeleton.get_submodule(arch.base_model)
    layers = skeleton.get_submodule(arch.block_prefix)
    captured = Captured([], [[] for _ in range(len(layers))])
    taps = torch.nn.ModuleList([_ArgumentTap(layer, i, captured) for i, layer in
                                enumerate(layers)])
    _set(skeleton, arch.block_prefix, taps)
    _set(skeleton, arch.final_norm, torch.nn.Identity())
    try:
        with torch.inference_mode():
            for batch in windows.split(batch_size):
                base(input_ids=batch.to(device), use_cache=False)
    finally:
        _set(skeleton, arch.block_prefix, layers)
        embed.to("meta")  # only the blocks' inputs were needed
    return captured


def walk_blocks(model: Model, skeleton: torch.nn.Module, captured: Captured,
                visit: Callable[["BlockContext"], tuple[Any, list[torch.Tensor]]],
                device: torch.device = CPU, targets: set[str] | None = None,
                **context: Any) -> Iterator[tuple[int, Any]]:
    """The one block loop: for every block, materialize it on ``device`` (weights read lazily),
    hand ``visit`` a :class:`BlockContext` with the block's inputs and its own layer arguments,
    take the next block's inputs from what ``visit`` returns, free the block, and yield
    ``(index, visit's result)``. ``context`` fills the remaining ``BlockContext`` fields."""
    hidden = captured.hidden
    for index in range(model.num_blocks):
        layer = materialize_block(skeleton, model, index, device)
        ctx = BlockContext(model, layer, index, hidden, captured.layer_kwargs[index],
                           targets if targets is not None else set(), **context)
        result, hidden = visit(ctx)
        layer.to("meta")  # release the block's memory
        yield index, result


def _run(layer: torch.nn.Module, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]]
         ) -> list[torch.Tensor]:
    outs = []
    with torch.inference_mode():
        for hidden, kwargs in zip(hidden, kwargs):
            out = layer(hidden, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def call_mixer(mixer: torch.nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    with torch.inference_mode():
        out = mixer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def capture_linear_inputs(mixer: torch.nn.Module, modules: dict[str, torch.nn.Module],
                          normed: list[torch.Tensor], kwargs: list[dict[str, Any]],
                          outputs: list[torch.Tensor] | None = None
                          ) -> dict[str, list[torch.Tensor]]:
    """Run ``mixer`` over every micro-batch; return what each of ``modules`` received (and
    append the mixer's outputs to ``outputs`` when given)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    handles = [m.register_forward_hook(lambda mod, inp, out, s=seen[n]: s.append(inp[0]))
               for n, m in modules.items()]
    try:
        for x, kw in zip(normed, kwargs):
            out = call_mixer(mixer, x, kw)
            if outputs is not None:
                outputs.append(out)
    finally:
        for h in handles:
            h.remove()
    return seen


class _InputTap(torch.nn.Module):
    """Stands in for a mixer's output linear while only its input is wanted: records the
    input and returns a zero-cost broadcast instead of computing the projection."""

    def __init__(self, linear: torch.nn.Linear, seen: list[torch.Tensor]):
        super().__init__()
        self.out_features = linear.out_features
        self.seen = seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return x.new_zeros(()).expand(*x.shape[:-1], self.out_features)


def capture_output_input(mixer: torch.nn.Module, output: str, normed: list[torch.Tensor],
                         kwargs: list[dict[str, Any]]) -> list[torch.Tensor]:
    """What the mixer's output linear ``output`` (a path inside ``mixer``) receives on every
    micro-batch, without computing that linear (the mixer's outputs are discarded)."""
    linear = mixer.get_submodule(output)
    seen: list[torch.Tensor] = []
    _set(mixer, output, _InputTap(linear, seen))
    try:
        for x, kw in zip(normed, kwargs):
            call_mixer(mixer, x, kw)
    finally:
        _set(mixer, output, linear)
    return seen


@dataclass
class BlockContext:
    """What a method sees of one block: the materialized layer and its calibration inputs."""

    model: Model
    layer: torch.nn.Module
    index: int
    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    targets: set[str]
    quantize_many: QuantizeManyFn | None = None  # linears sharing an input in one call
    attention_values: bool = False  # value projections get per-kv-head attention Hessians
    calibration: Captured | None = None  # every block's inputs (a measurement pass reuses them)

    @property
    def device(self) -> torch.device:
        return self.hidden[0].device if self.hidden else CPU

    @property
    def attention_kind(self) -> str:
        """This block's attention kind (``full_attention``, ``sliding_attention``)."""
        return self.model.arch.attention_kinds(self.model.config,
                                               self.model.num_blocks)[self.index]

    def weight_name(self, linear: str) -> str:
        return f"{self.model.arch.block_module(self.index, linear)}.weight"

    def source_weight(self, linear: str) -> torch.Tensor:
        """The layer's current weight in the checkpoint's dtype (a method may have rescaled it)."""
        name = self.weight_name(linear)
        return self.layer.get_submodule(linear).weight.detach().to(
            self.model.weights.dtype(name))

    def sublayer_kwargs(self, sub: Sublayer) -> list[dict[str, Any]]:
        return self.kwargs if sub.takes_layer_kwargs else [{} for _ in self.hidden]

    def groups_of(self, sub: Sublayer) -> list[tuple[str, ...]]:
        return [g for g in self.model.arch.sequential_groups if g[0].startswith(sub.mixer + ".")]


def _quantize_group(ctx: BlockContext, group: tuple[str, ...], feats: list[torch.Tensor] | None,
                    statistic: str | None, quantize_fn: QuantizeFn,
                    own: dict[str, Any] | None = None) -> dict[str, Any]:
    """Quantize the targets of one group from a statistic over ``feats`` (their shared input);
    put the dequantized weights back so later groups see quantized inputs. ``own`` gives some
    linears a statistic of their own (quantized one by one, after the shared ones)."""
    own = own or {}
    active = [lin for lin in group if ctx.weight_name(lin) in ctx.targets]
    if not active:
        return {}
    results = {}
    if any(lin in own for lin in active):
        shared = tuple(lin for lin in group if lin not in own)
        results = _quantize_group(ctx, shared, feats, statistic, quantize_fn) if shared else {}
        for lin in (lin for lin in active if lin in own):
            name = ctx.weight_name(lin)
            qt = quantize_fn(name, ctx.source_weight(lin), own[lin])
            results[name] = _put_back(ctx, lin, qt)
        return results
    stat = None
    if statistic is not None:
        collector = COLLECTORS[statistic](ctx.layer.get_submodule(active[0]).in_features,
                                          device=ctx.device)
        for f in feats or []:
            collector.add(f)
        stat = collector.result()
    names = [ctx.weight_name(lin) for lin in active]
    qts = None
    if ctx.quantize_many is not None and len(active) > 1 and stat is not None and \
            sum(math.prod(ctx.model.weights.shape(n)) for n in names) <= stack_limit(ctx.device):
        qts = ctx.quantize_many(names, [ctx.source_weight(lin) for lin in active], stat)
    if qts is None:
        qts = [quantize_fn(name, ctx.source_weight(lin), stat) for name, lin in zip(names, active)]
    for lin, name, qt in zip(active, names, qts):
        results[name] = _put_back(ctx, lin, qt)
    return results


def _put_back(ctx: BlockContext, linear: str, qt: Any) -> Any:
    """Dequantized weights into the block (later groups see them); the result on the CPU."""
    ctx.layer.get_submodule(linear).weight.data.copy_(qt.dequantize())
    return qt if ctx.device.type == "cpu" else qt.to(CPU)


def _value_statistics(ctx: BlockContext, sub: Sublayer, group: tuple[str, ...],
                      mixer: torch.nn.Module, normed: list[torch.Tensor],
                      kwargs: list[dict[str, Any]]) -> dict[str, Any]:
    """``{value linear: HeadHessians}`` when the method asks for attention-weighted value
    statistics and this group quantizes the sublayer's value projection; else empty."""
    if not (ctx.attention_values and sub.values in group
            and ctx.weight_name(sub.values) in ctx.targets):
        return {}
    from quantbench.calibration.attention import value_hessians

    heads, kv_heads = ctx.model.arch.head_counts(ctx.model.config)
    with heap_for_temporaries():
        return {sub.values: value_hessians(mixer, normed, kwargs, heads, kv_heads)}


STACK_ELEMENTS_CPU = 1 << 24   # weights one shared-input sweep may stack (float32 copies: 64 MB)
STACK_ELEMENTS_GPU = 1 << 28


def stack_limit(device: torch.device) -> int:
    """How many weights a method may quantize in one stacked call on ``device``: stacking
    saves per-column steps (launch-bound on a GPU) at the cost of a few float32 copies of the
    stack, kept small on the CPU so peak memory stays one block plus activations."""
    return STACK_ELEMENTS_GPU if device.type == "cuda" else STACK_ELEMENTS_CPU


def quantize_block_staged(ctx: BlockContext, statistic: str | None,
                          quantize_fn: QuantizeFn) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """True-sequential quantization, one residual branch at a time.

    A group that reads the branch input needs no forward pass (its statistic comes from
    ``norm(x)``); an inner group needs one pass of the mixer (with earlier groups already
    quantized) to see its input; the branch output is then the output linear applied to its
    captured input. About 1.3 block forwards per block instead of one per group plus one."""
    results: dict[str, Any] = {}
    x = ctx.hidden
    for sub in ctx.model.arch.sublayers or ():
        norm, mixer = ctx.layer.get_submodule(sub.norm), ctx.layer.get_submodule(sub.mixer)
        kwargs = ctx.sublayer_kwargs(sub)
        with torch.inference_mode():
            normed = [norm(h) for h in x]
        out_feats = None
        for group in ctx.groups_of(sub):
            is_output = group == (sub.output,)
            has_target = any(ctx.weight_name(lin) in ctx.targets for lin in group)
            if not (has_target and statistic) and not is_output:
                results.update(_quantize_group(ctx, group, None, None, quantize_fn))
                continue
            own: dict[str, Any] = {}
            if set(group) <= set(sub.inputs):
                feats = normed
                own = _value_statistics(ctx, sub, group, mixer, normed, kwargs)
            elif is_output:
                with heap_for_temporaries():
                    feats = capture_output_input(mixer, sub.output[len(sub.mixer) + 1:],
                                                 normed, kwargs)
            else:
                feats = capture_linear_inputs(
                    mixer, {group[0]: ctx.layer.get_submodule(group[0])}, normed,
                    kwargs)[group[0]]
            results.update(_quantize_group(ctx, group, feats, statistic, quantize_fn, own))
            if is_output:
                out_feats = feats
        with torch.inference_mode():
            if out_feats is not None:
                out_linear = ctx.layer.get_submodule(sub.output)
                branch = (out_linear(f) for f in out_feats)
            else:
                branch = (call_mixer(mixer, n, kw) for n, kw in zip(normed, kwargs))
            x = residual_add(ctx.layer, sub, x, branch)
    return results, x


def residual_add(layer: torch.nn.Module, sub: Sublayer, x: list[torch.Tensor],
                 branch: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """``x + post_norm(branch)`` per micro-batch (``x + branch`` when the sublayer declares no
    norm after its branch, as in llama; Gemma 2/3 and OLMo 2 norm the branch output)."""
    if sub.post_norm is None:
        return [h + b for h, b in zip(x, branch)]
    post = layer.get_submodule(sub.post_norm)
    return [h + post(b) for h, b in zip(x, branch)]


def quantize_block(ctx: BlockContext, statistic: str | None,
                   quantize_fn: QuantizeFn) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """True-sequential quantization running the whole block once per group, then once more
    for the next block's inputs: for architectures without declared sublayers."""
    results: dict[str, Any] = {}
    for group in ctx.model.arch.sequential_groups:
        modules = {lin: ctx.layer.get_submodule(lin) for lin in group
                   if ctx.weight_name(lin) in ctx.targets}
        if not modules:
            continue
        feats: list[torch.Tensor] = []
        if statistic is not None:
            first = next(iter(modules.values()))
            handle = first.register_forward_hook(lambda mod, inp, out: feats.append(inp[0]))
            try:
                _run(ctx.layer, ctx.hidden, ctx.kwargs)
            finally:
                handle.remove()
        results.update(_quantize_group(ctx, group, feats, statistic, quantize_fn))
    return results, _run(ctx.layer, ctx.hidden, ctx.kwargs)


def _on_cpu(quantize_fn: QuantizeFn) -> QuantizeFn:
    """For methods whose maths is CPU-only (``device_capable`` False): hand them CPU copies."""
    def run(name: str, weight: torch.Tensor, stat: Any) -> Any:
        if isinstance(stat, (torch.Tensor, HeadHessians)):
            stat = stat.to(CPU)
        return quantize_fn(name, weight.to(CPU), stat)
    return run


def run_pipeline(model: Model, windows: torch.Tensor, targets: set[str], method: "Method",
                 batch_size: int = 8, staged: bool = True, device: torch.device = CPU
                 ) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(block index, {tensor name: QuantizedTensor or tensor})`` in order, on the CPU.

    ``method`` (the ``Method`` contract) provides ``statistic`` (a collector name, or None),
    ``quantize_with_stats(name, weight, statistic)``, ``quantize_many_with_stats`` for linears
    sharing an input, ``attention_values``, and ``prepare_block(ctx)``, run on the float block
    first (AWQ rescales and clips there). Non-quantized tensors come from the block as the
    method left it, in the checkpoint's dtype. On a GPU ``device`` the block forwards and
    statistics run there; so does ``quantize_with_stats`` when the method is
    ``device_capable``."""
    pin_mmap_threshold()
    skeleton = _skeleton(model)
    captured = capture_inputs(model, skeleton, windows, batch_size, device)
    quantize_fn: QuantizeFn = method.quantize_with_stats
    quantize_many: QuantizeManyFn | None = method.quantize_many_with_stats
    if device.type != "cpu" and not method.device_capable:
        quantize_fn = _on_cpu(quantize_fn)
        quantize_many = None
    run = quantize_block_staged if staged and model.arch.sublayers else quantize_block

    def visit(ctx: BlockContext) -> tuple[dict[str, Any], list[torch.Tensor]]:
        method.prepare_block(ctx)
        quantized, outputs = run(ctx, method.statistic, quantize_fn)
        prefix = f"{model.arch.block_prefix}.{ctx.index}."
        state = ctx.layer.state_dict()
        tensors = {n: quantized[n] if n in quantized else
                   state[n[len(prefix):]].detach().to(CPU, model.weights.dtype(n), copy=True)
                   for n in model.block_tensor_names(ctx.index)}
        return tensors, outputs

    yield from walk_blocks(model, skeleton, captured, visit, device, targets,
                           quantize_many=quantize_many,
                           attention_values=bool(method.attention_values),
                           calibration=captured)
