"""The sequential quantization pipeline every data-driven method runs on.

On the one block loop (``blocks.py``: every block's inputs and own layer arguments), block by
block: the method prepares the float block (AWQ's search), then for each true-sequential group
of linears the block's branches run over the calibration windows with taps that feed the
method's collectors; the group is quantized and its dequantized weights put back, so later
groups see quantized inputs; the branch outputs make the next block's inputs. Peak memory: one block plus the
calibration activations. On a CUDA device the block, its calibration activations and the
method's maths live on the GPU; what a block yields is always on the CPU.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Callable, Iterator

from quantbench.calibration.attention import HeadHessians
from quantbench.calibration.blocks import (BlockContext, Captured, QuantizeManyFn,  # noqa: F401
                                           _run, _set, _skeleton, call_mixer, capture_inputs,
                                           capture_linear_inputs, capture_output_input,
                                           materialize_block, residual_add, walk_blocks)
from quantbench.calibration.collectors import COLLECTORS
from quantbench.calibration.memory import heap_for_temporaries, pin_mmap_threshold
from quantbench.config import CalibrationOptions
from quantbench.quant.gptq import SINGLE_THREAD_ELEMENTS
from quantbench.threads import run_chunks
from quantbench.devices import CPU
from quantbench.errors import QuantbenchError
from quantbench.finite import count_non_finite
from quantbench.lazy import torch
from quantbench.models.arch import Sublayer
from quantbench.models.loader import Model

if TYPE_CHECKING:
    from quantbench.quant.methods.base import Method

log = logging.getLogger(__name__)

# quantize_fn(weight name, weight, statistic or None) -> QuantizedTensor
QuantizeFn = Callable[[str, "torch.Tensor", Any], Any]


def _quantize_group(ctx: BlockContext, group: tuple[str, ...], feats: list[torch.Tensor] | None,
                    statistic: str | None, quantize_fn: QuantizeFn,
                    own: dict[str, Any] | None = None,
                    float_feats: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """Quantize the targets of one group from a statistic over ``feats`` (their shared input);
    put the dequantized weights back so later groups see quantized inputs. ``own`` gives some
    linears a statistic of their own (quantized one by one, after the shared ones).
    ``float_feats`` (the float model's inputs of the same tokens) turn each shared-statistic
    weight into GPTQ's float-target weight (:func:`float_target_weight`) first."""
    own = own or {}
    active = [lin for lin in group if ctx.weight_name(lin) in ctx.targets]
    if not active:
        return {}
    results = {}
    if any(lin in own for lin in active):
        shared = tuple(lin for lin in group if lin not in own)
        results = _quantize_group(ctx, shared, feats, statistic, quantize_fn,
                                  float_feats=float_feats) if shared else {}
        for lin in (lin for lin in active if lin in own):
            name = ctx.weight_name(lin)
            check_statistic(ctx, name, own[lin], None)
            qt = quantize_fn(name, ctx.source_weight(lin), own[lin])
            results[name] = _put_back(ctx, lin, qt)
        return results
    stat = None
    names = [ctx.weight_name(lin) for lin in active]
    if statistic is not None:
        collector = COLLECTORS[statistic](ctx.layer.get_submodule(active[0]).in_features,
                                          device=ctx.device)
        for f in feats or []:
            collector.add(f)
        stat = collector.result()
        check_statistic(ctx, names[0], stat, feats)
    sources = [ctx.source_weight(lin) for lin in active]
    if float_feats is not None and isinstance(stat, torch.Tensor) and \
            ctx.float_targets is not None:
        from quantbench.quant.gptq import float_target_weight

        cross = cross_statistic(float_feats, feats or [])
        sources = [float_target_weight(w, cross, stat, ctx.float_targets).to(w.dtype)
                   for w in sources]
        del cross
    qts = None
    if ctx.quantize_many is not None and len(active) > 1 and stat is not None and \
            sum(math.prod(ctx.model.weights.shape(n)) for n in names) <= stack_limit(ctx.device):
        qts = ctx.quantize_many(names, sources, stat)
    if qts is None:
        qts = [quantize_fn(name, w, stat) for name, w in zip(names, sources)]
    for lin, name, qt in zip(active, names, qts):
        results[name] = _put_back(ctx, lin, qt)
    return results


def cross_statistic(float_feats: list[torch.Tensor], feats: list[torch.Tensor]
                    ) -> torch.Tensor:
    """``C = 2·X_fᵀX_q / n`` over the same tokens (float model's inputs × the quantized
    model's), scaled as the Hessian collector scales ``H``."""
    cross, n = None, 0
    for f, q in zip(float_feats, feats):
        f2 = f.reshape(-1, f.shape[-1]).float()
        q2 = q.reshape(-1, q.shape[-1]).float()
        cross = f2.T @ q2 if cross is None else cross.addmm_(f2.T, q2)
        n += q2.shape[0]
    if cross is None:
        raise QuantbenchError("float targets: no calibration inputs reached the linear")
    return cross.mul_(2.0 / n)


def _statistic_tensors(stat: Any) -> list[torch.Tensor]:
    """The tensors a collector's result holds (a tensor, ``(tensor, count)``, HeadHessians)."""
    if isinstance(stat, HeadHessians):
        return [stat.per_head] + ([] if stat.others is None else [stat.others])
    if isinstance(stat, tuple):
        return [s for s in stat if isinstance(s, torch.Tensor)]
    return [stat] if isinstance(stat, torch.Tensor) else []


def check_statistic(ctx: BlockContext, name: str, stat: Any,
                    feats: list[torch.Tensor] | None) -> None:
    """Refuse a calibration statistic holding NaN/Inf (the Hessian of activations beyond
    float32's range, say) before a method turns it into codes, naming the tensor and block."""
    bad = sum(count_non_finite(t) for t in _statistic_tensors(stat))
    if not bad:
        return
    in_feats = sum(count_non_finite(f) for f in feats or [])
    if in_feats:
        cause = f"the activations reaching it hold {in_feats} NaN/Inf values"
    else:
        largest = max((float(f.abs().max()) for f in feats or [] if f.numel()), default=0.0)
        cause = f"it overflows float32 (largest |activation| {largest:.3g})"
    raise QuantbenchError(
        f"the calibration statistic of {name} in block {ctx.index} holds {bad} non-finite "
        f"values: {cause}; the source weights are likely damaged (check their magnitudes), "
        "or use a data-free method")


def _put_back(ctx: BlockContext, linear: str, qt: Any) -> Any:
    """Dequantized weights into the block (later groups see them); the result on the CPU."""
    ctx.layer.get_submodule(linear).weight.data.copy_(qt.dequantize())
    return qt if ctx.device.type == "cpu" else qt.to(CPU)


def _value_statistics(ctx: BlockContext, sub: Sublayer, group: tuple[str, ...],
                      mixer: torch.nn.Module, normed: list[torch.Tensor],
                      kwargs: list[dict[str, Any]], statistic: str,
                      weights: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """``{value linear: HeadHessians}`` when the method asks for attention-weighted value
    statistics and this group quantizes the sublayer's value projection; else empty. A value
    projection stored inside a fused linear (``ArchSpec.fused``) gives that linear's
    statistic: its value rows on the per-head Hessians, its other rows on ``statistic``."""
    if sub.values is None:
        return {}
    linear, rows = ctx.model.arch.stored(sub.values, ctx.model.config)
    if not (ctx.attention_values and linear in group and ctx.weight_name(linear) in ctx.targets):
        return {}
    from quantbench.calibration.attention import value_hessians

    heads, kv_heads = ctx.model.arch.head_counts(ctx.model.hparams)
    with heap_for_temporaries():
        found = value_hessians(mixer, normed, kwargs, heads, kv_heads, weights)
    if rows is not None:
        collector = COLLECTORS[statistic](ctx.layer.get_submodule(linear).in_features,
                                          device=ctx.device)
        for f in normed:
            collector.add(f)
        found = HeadHessians(found.per_head, rows, collector.result())
    return {linear: found}


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
    ref = ctx.reference if ctx.float_targets is not None and statistic == "hessian" else None
    for sub in ctx.model.arch.sublayers or ():
        norm, mixer = ctx.layer.get_submodule(sub.norm), ctx.layer.get_submodule(sub.mixer)
        kwargs = ctx.sublayer_kwargs(sub)
        with torch.inference_mode():
            normed = [norm(h) for h in x]
        if sub.output is None:  # routed experts (models/experts.py)
            if ref is not None:
                raise QuantbenchError("--float-targets does not support mixture-of-experts "
                                      "blocks; drop the flag")
            results.update(quantize_experts(ctx, sub, mixer, normed, statistic, quantize_fn))
            with torch.inference_mode():
                x = residual_add(ctx.layer, sub, x, (call_mixer(mixer, n, {}) for n in normed))
            continue
        weights = None
        if sub.post_norm is not None and statistic == "hessian":
            weights = post_norm_weights(mixer, normed, kwargs)
        float_inputs: dict[tuple[str, ...], list[torch.Tensor]] = {}
        if ref is not None:  # the float model's inputs of every group, before any is rounded
            float_inputs, ref = float_model_inputs(ctx, sub, ref, kwargs)
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
                own = _value_statistics(ctx, sub, group, mixer, normed, kwargs, statistic,
                                        weights)
            elif is_output:
                with heap_for_temporaries():
                    feats = capture_output_input(mixer, sub.output[len(sub.mixer) + 1:],
                                                 normed, kwargs)
            else:
                feats = capture_linear_inputs(
                    mixer, {group[0]: ctx.layer.get_submodule(group[0])}, normed,
                    kwargs)[group[0]]
            per_token = is_output or (set(group) <= set(sub.inputs)
                                      and not sub.takes_layer_kwargs)  # an MLP's inputs
            float_seen = float_inputs.get(group)
            if weights is not None and per_token:
                seen = [f * w.to(f.dtype) for f, w in zip(feats, weights)]
                if float_seen is not None:
                    float_seen = [f * w.to(f.dtype) for f, w in zip(float_seen, weights)]
            else:
                seen = feats
            results.update(_quantize_group(ctx, group, seen, statistic, quantize_fn, own,
                                           float_seen))
            if is_output:
                out_feats = feats
        with torch.inference_mode():
            if out_feats is not None:
                out_linear = ctx.layer.get_submodule(sub.output)
                branch = (out_linear(f) for f in out_feats)
            else:
                branch = (call_mixer(mixer, n, kw) for n, kw in zip(normed, kwargs))
            x = residual_add(ctx.layer, sub, x, branch)
    if ref is not None:
        ctx.reference = ref
    return results, x


def _expert_inputs(experts: torch.nn.Module, projection: str, mixer: torch.nn.Module,
                   normed: list[torch.Tensor]
                   ) -> tuple[dict[int, list[torch.Tensor]], dict[int, list[torch.Tensor]]]:
    """One pass of the MoE ``mixer``: what each expert's ``projection`` receives (only the
    tokens routed to it) and those tokens' routing weights, by expert index."""
    modules = {str(e): expert.get_submodule(projection) for e, expert in enumerate(experts)}
    experts.recording = {}
    try:
        seen = capture_linear_inputs(mixer, modules, normed, [{} for _ in normed])
        routed = experts.recording
    finally:
        experts.recording = None
    return {int(e): v for e, v in seen.items()}, routed


def _routed_counts(router: torch.nn.Module, normed: list[torch.Tensor], count: int
                   ) -> list[int]:
    """Tokens the router sends each expert over the calibration batches (a top-k slot each)."""
    total = torch.zeros(count, dtype=torch.long)
    with torch.inference_mode():
        for h in normed:
            indices = router(h.reshape(-1, h.shape[-1]))[-1]
            total += torch.bincount(indices.reshape(-1).cpu(), minlength=count)[:count]
    return [int(n) for n in total]


def quantize_experts(ctx: BlockContext, sub: Sublayer, mixer: torch.nn.Module,
                     normed: list[torch.Tensor], statistic: str | None,
                     quantize_fn: QuantizeFn) -> dict[str, Any]:
    """A mixture-of-experts branch, calibrated by the router: one mixer pass captures what
    every expert's gate/up receive (the tokens routed to it), each expert's gate+up are
    quantized on that; a second pass (quantized gate/up) does the same for the downs.

    With a Hessian statistic and ``router_weighted`` (opt-in) each token's input is scaled by
    its routing weight (the expert's output is, so its squared error counts ``w²``). An expert
    routed fewer than ``expert_min_tokens`` tokens takes all of the layer's tokens instead
    (force-routing: its gate/up see every ``norm(x)``, its down what its own quantized
    gate/up make of them), unweighted. Token counts are recorded in ``ctx.expert_tokens``."""
    spec = ctx.model.arch.experts
    experts = ctx.layer.get_submodule(spec.module)
    gate, up, down = (p for p, _ in spec.projections)
    results: dict[str, Any] = {}
    counts: list[int] = []
    for stage, projections in enumerate(((gate, up), (down,))):
        feats: dict[int, list[torch.Tensor]] = {}
        routed: dict[int, list[torch.Tensor]] = {}
        if statistic is not None:
            with heap_for_temporaries():
                feats, routed = _expert_inputs(experts, projections[0], mixer, normed)
        tokens = [sum(int(f.reshape(-1, f.shape[-1]).shape[0]) for f in feats.get(e, []))
                  for e in range(len(experts))]
        if stage == 0:  # (no statistic: the router alone says how the tokens are spread)
            counts = tokens if statistic is not None else \
                _routed_counts(ctx.layer.get_submodule(spec.router), normed, len(experts))
        done: dict[int, dict[str, Any]] = {}

        def one(e: int, projections: tuple[str, ...] = projections,
                feats: dict = feats, routed: dict = routed, done: dict = done) -> None:
            group = tuple(spec.linear(e, p) for p in projections)
            seen = None
            if statistic is not None:
                if tokens[e] < max(1, ctx.expert_min_tokens):  # force-routing: every token
                    with torch.inference_mode():
                        seen = normed if projections[0] == gate else \
                            [experts[e].inner(h) for h in normed]
                elif statistic == "hessian" and ctx.router_weighted:
                    seen = [f * w.to(f.dtype)[:, None] for f, w in zip(feats[e], routed[e])]
                else:
                    seen = feats[e]
            done[e] = _quantize_group(ctx, group, seen, statistic, quantize_fn)

        # small experts side by side on worker threads (each single-threaded: its solve is
        # many small ops), large ones or a GPU one at a time with every thread
        size = experts[0].get_submodule(projections[0]).weight.numel()
        if ctx.device.type == "cpu" and size <= SINGLE_THREAD_ELEMENTS:
            run_chunks(one, range(len(experts)))
        else:
            for e in range(len(experts)):
                one(e)
        for e in range(len(experts)):
            results.update(done[e])
    if ctx.expert_tokens is not None:
        ctx.expert_tokens[ctx.index] = counts
    return results


def float_model_inputs(ctx: BlockContext, sub: Sublayer, ref: list[torch.Tensor],
                       kwargs: list[dict[str, Any]]
                       ) -> tuple[dict[tuple[str, ...], list[torch.Tensor]], list[torch.Tensor]]:
    """What the float model feeds each group of sublayer ``sub`` (its own stream ``ref``
    through the float weights: run before any of the sublayer's groups is rounded), and the
    float stream after the sublayer."""
    norm, mixer = ctx.layer.get_submodule(sub.norm), ctx.layer.get_submodule(sub.mixer)
    groups = ctx.groups_of(sub)
    with torch.inference_mode():
        normed = [norm(h) for h in ref]
    inner = {g[0]: ctx.layer.get_submodule(g[0]) for g in groups if not set(g) <= set(sub.inputs)}
    branch: list[torch.Tensor] = []
    with heap_for_temporaries():
        seen = capture_linear_inputs(mixer, inner, normed, kwargs, outputs=branch)
    found = {g: normed if set(g) <= set(sub.inputs) else seen[g[0]] for g in groups}
    with torch.inference_mode():
        return found, residual_add(ctx.layer, sub, ref, branch)


def post_norm_weights(mixer: torch.nn.Module, normed: list[torch.Tensor],
                      kwargs: list[dict[str, Any]]) -> list[torch.Tensor]:
    """``1/rms_t`` of the float branch output per token (mean square 1), for a branch normed
    on its output (Gemma's post-branch norms): ``RMSNorm(y + Δy)`` moves by about
    ``Δy / rms(y)``, so token ``t``'s squared error counts ``1/rms_t²``. Scaling a linear's
    inputs by it gives the Hessian of that objective — exact for the output linear and for
    the inputs of a per-token mixer (the MLP), instead of one that lets the few tokens with
    huge branch outputs (the BOS sink) decide where the error goes."""
    with torch.inference_mode():
        inv = [call_mixer(mixer, n, kw).float().pow(2).mean(-1, keepdim=True).add(1e-12)
               .reciprocal() for n, kw in zip(normed, kwargs)]
        mean = torch.cat([w.reshape(-1) for w in inv]).mean()
        return [(w / mean).sqrt() for w in inv]


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
                 batch_size: int = 8, staged: bool = True, device: torch.device = CPU,
                 expert_tokens: dict[int, list[int]] | None = None
                 ) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(block index, {tensor name: QuantizedTensor or tensor})`` in order, on the CPU.

    ``method`` (the ``Method`` contract) provides ``statistic`` (a collector name, or None),
    ``quantize_with_stats(name, weight, statistic)``, ``quantize_many_with_stats`` for linears
    sharing an input, ``attention_values``, and ``prepare_block(ctx)``, run on the float block
    first (AWQ rescales and clips there). Non-quantized tensors come from the block as the
    method left it, in the checkpoint's dtype. On a GPU ``device`` the block forwards and
    statistics run there; so does ``quantize_with_stats`` when the method is
    ``device_capable``. ``expert_tokens`` (a mixture-of-experts model) receives each block's
    calibration token count per expert."""
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

    float_targets = method.float_targets
    expert_options = {}
    if model.arch.experts is not None and isinstance(method.config.options, CalibrationOptions):
        options = method.config.options
        expert_options = {"expert_min_tokens": options.expert_min_tokens,
                          "router_weighted": options.router_weighted}
    if model.arch.experts is not None and run is quantize_block:
        raise QuantbenchError("a mixture-of-experts model is calibrated branch by branch; "
                              "it cannot run unstaged")
    if float_targets is not None and run is quantize_block:
        raise QuantbenchError(f"--float-targets needs the {model.arch.family} block "
                              "declared as residual branches (ArchSpec.sublayers); drop the "
                              "flag for this model")
    yield from walk_blocks(model, skeleton, captured, visit, device, targets,
                           quantize_many=quantize_many,
                           attention_values=bool(method.attention_values),
                           calibration=captured, float_targets=float_targets,
                           expert_tokens=expert_tokens,
                           **expert_options)
