"""AWQ's search on one float block: capture what each linear receives, search the scales and
clips (``quant/awq.py``'s pure maths), fold them in; and re-apply a saved search.

Per block and residual branch (``ArchSpec.sublayers``): one float pass captures what every
linear receives and the branch output; for each ``scale_folding`` pair the scales are searched
against the output of the module that consumes them (the whole attention or MLP for a norm
pair, the single linear for a linear pair) and folded in; each weight's group ranges are then
clipped (q/k exempt, as in AWQ).
"""
from __future__ import annotations

import logging
from typing import Callable

from quantbench.calibration.collectors import ActMagnitudeCollector
from quantbench.config import GridConfig, QuantizeConfig
from quantbench.errors import ConfigError
from quantbench.lazy import torch
from quantbench.quant.awq import (apply_clip, fold_norm, fold_scales, output_error,
                                  search_clip, search_scales)
from quantbench.quant.grid import pad_groups

log = logging.getLogger(__name__)

CLIP_EXEMPT = ("q_proj", "k_proj")  # their errors feed a dot product, AWQ leaves them unclipped

GridFor = Callable[[str], "GridConfig | None"]  # full weight name → the grid searches use


def _grid_for(grid: "GridConfig | GridFor") -> GridFor:
    return grid if callable(grid) else (lambda name: grid)


def _subset(items: list, windows: list[torch.Tensor], n: int) -> list:
    """The first micro-batches covering ``n`` windows."""
    out, seen = [], 0
    for item, w in zip(items, windows):
        if seen >= n:
            break
        out.append(item)
        seen += w.shape[0]
    return out


class _Stop(Exception):
    """Raised by a pre-hook to end a mixer forward once everything needed was captured."""


class _Input:
    """What the search needs of one linear input over all calibration micro-batches, gathered
    batch by batch (nothing of full size is kept): the mean ``|x|`` per channel (``mean``),
    the micro-batches the scale search runs on (``search``) and the evenly strided token
    sample the clip search runs on (``sample``, tokens ``0, step, 2·step, …``)."""

    def __init__(self, total: int, n_search: int, clip_tokens: int, want_mean: bool):
        self.total, self.n_search, self.want_mean = total, n_search, want_mean
        self.clip_tokens = clip_tokens
        self.step = max(1, total // clip_tokens)
        self.seen = 0
        self.magnitude = ActMagnitudeCollector(0)
        self.search: list[torch.Tensor] = []
        self.parts: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1])
        if self.want_mean:
            self.magnitude.add(flat)
        if len(self.search) < self.n_search:
            self.search.append(x)
        first = (-self.seen) % self.step
        self.parts.append(flat[first::self.step].clone())  # a view would keep the batch
        self.seen += flat.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.magnitude.result()

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self.parts)[: self.clip_tokens]


def _capture(mixer, modules: dict, normed: list[torch.Tensor], kwargs: list[dict],
             inputs: dict[str, _Input], outs: list[torch.Tensor], n_out: int,
             stop_at: str | None) -> None:
    """Run ``mixer`` over every micro-batch, feeding what each of ``modules`` receives to its
    ``_Input``; keep the first ``n_out`` outputs. From micro-batch ``n_out`` on, the forward
    ends at ``stop_at`` (the branch's output linear, its last step) once every input of the
    batch was seen: its output is not needed there."""
    batch = [0]
    seen: set[str] = set()

    def hook(name):
        def pre(mod, args):
            inputs[name].add(args[0])
            seen.add(name)
            if name == stop_at and batch[0] >= n_out and seen >= set(modules):
                raise _Stop
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        for i, (x, kw) in enumerate(zip(normed, kwargs)):
            batch[0] = i
            seen.clear()
            try:
                out = mixer(x, **kw)
            except _Stop:
                continue
            if i < n_out:
                outs.append(out[0] if isinstance(out, tuple) else out)
    finally:
        for h in handles:
            h.remove()


def _awq_block(ctx, config: QuantizeConfig, grid_for: GridFor) -> dict[str, torch.Tensor]:
    with torch.inference_mode():  # (a context, not a decorator: importing reads no torch)
        return _search_block(ctx, config, grid_for)


def _search_block(ctx, config: QuantizeConfig, grid_for: GridFor) -> dict[str, torch.Tensor]:
    from quantbench.calibration.blocks import residual_add  # (its nn.Module classes load torch)

    o, arch, layer = config.options, ctx.model.arch, ctx.layer
    prefix = f"{arch.block_prefix}.{ctx.index}."
    result: dict[str, torch.Tensor] = {}
    x = ctx.hidden
    n_search = len(_subset(x, x, o.search_samples))
    total = sum(h.shape[:-1].numel() for h in x)
    firsts = {linears[0] for _, linears in arch.scale_folding}  # inputs whose mean |x| is used
    subs = arch.sublayers
    for k, sub in enumerate(subs):
        last = k == len(subs) - 1
        norm, mixer = layer.get_submodule(sub.norm), layer.get_submodule(sub.mixer)
        kwargs = ctx.sublayer_kwargs(sub)
        groups = ctx.groups_of(sub)
        normed = [norm(h) for h in x]
        # one _Input per distinct input: the branch input norm(x) (read by every group of
        # sub.inputs) and each inner group's (captured in the mixer)
        reads = [g for g in groups if g[0] in sub.inputs]
        inputs: dict[str, _Input] = {}
        if reads:
            branch_in = _Input(total, n_search, o.clip_tokens,
                               any(lin in firsts for g in reads for lin in g))
            for h in normed:
                branch_in.add(h)
            inputs.update({lin: branch_in for g in reads for lin in g})
        if sub.output is None:  # routed experts: the router reads norm(x) (scales fold
            router = arch.experts.router  # into it exactly), each expert only its tokens
            inputs[router] = _Input(total, n_search, o.clip_tokens, True)
            for h in normed:
                inputs[router].add(h)
        for group in groups:
            if group[0] not in sub.inputs:
                shared = _Input(total, n_search, o.clip_tokens, any(g in firsts for g in group))
                inputs.update({lin: shared for lin in group})
        inner = {g[0]: layer.get_submodule(g[0]) for g in groups if g[0] not in sub.inputs}
        outs: list[torch.Tensor] = []
        # the branch output of every batch feeds the next branch; after the last branch only
        # the scale search's reference batches are needed
        n_out = n_search if last else len(normed)
        _capture(mixer, inner, normed, kwargs, inputs, outs, n_out,
                 sub.output if sub.output in inner else None)
        scaled: dict[str, torch.Tensor] = {}  # folded scales by the linear that consumes them
        for prev, linears in arch.scale_folding:
            if not linears[0].startswith(sub.mixer + "."):
                continue
            if not any(ctx.weight_name(lin) in ctx.targets for lin in linears):
                continue
            stored, rows = arch.stored(prev, ctx.model.config)  # a part: rows of a fused one
            prev_mod = layer.get_submodule(stored)
            mods = [layer.get_submodule(lin) for lin in linears]
            width = prev_mod.weight.shape[0] if rows is None else rows.stop - rows.start
            if width != mods[0].weight.shape[1]:
                log.debug("block %d: %s → %s shapes differ, no scales", ctx.index, prev, linears)
                continue
            feed = inputs[linears[0]]
            if not feed.seen:  # an expert no calibration token reached: no scales
                continue
            # the linears the search quantizes: an MoE router takes the scales, unquantized
            lins = [lin for lin in linears if arch.experts is None or lin != arch.experts.router]
            qmods = [layer.get_submodule(lin) for lin in lins]
            if set(linears) <= set(sub.inputs) or (sub.output is None and prev == sub.norm):
                reference = _joined(outs[:n_search])  # inspect the whole branch
                inspect = _branch_inspector(mixer, qmods, normed[:n_search], kwargs[:n_search])
            else:                                 # inspect the single consuming linear
                x_sub = _joined(feed.search)
                reference = mods[0](x_sub)
                inspect = _linear_inspector(mods[0], x_sub)
            grids = [g for g in (grid_for(ctx.weight_name(lin)) for lin in lins) if g]
            if not grids:  # e.g. GGUF tensors kept in float
                continue
            grid = min(grids, key=lambda g: g.bits)  # the coarsest grid the scales must serve
            found = search_scales(feed.mean, [m.weight.data for m in qmods], grid,
                                  n_grid=o.n_grid, duo=o.duo_scaling, exhaustive=o.exhaustive,
                                  error=output_error(inspect, reference))
            fold_scales(prev_mod, mods, found.scales, arch.norm_offset, rows)
            result[f"{prefix}{prev}.awq_scales"] = found.scales
            for lin in linears:
                scaled[lin] = found.scales
        if o.clip:
            samples: dict[tuple[int, int], torch.Tensor] = {}
            for group in groups:
                for lin in group:
                    if lin.endswith(CLIP_EXEMPT) or ctx.weight_name(lin) not in ctx.targets \
                            or not inputs[lin].seen:  # (an expert no token reached)
                        continue
                    module = layer.get_submodule(lin)
                    key = id(inputs[lin]), id(scaled.get(lin))
                    if key not in samples:
                        sample = inputs[lin].sample
                        samples[key] = sample / scaled[lin] if lin in scaled else sample
                    grid = grid_for(ctx.weight_name(lin))
                    if grid is None:
                        continue
                    max_val = search_clip(module.weight.data, samples[key], grid, o.clip_grid,
                                          o.max_shrink)
                    _unclip_exempt_parts(max_val, module.weight.data, arch.fused_parts(lin),
                                         ctx.model.config, grid)
                    module.weight.data.copy_(apply_clip(module.weight.data, max_val, grid))
                    result[f"{prefix}{lin}.awq_clip"] = max_val
        if not last:
            x = residual_add(layer, sub, x, outs)  # the float branch output (scales keep it)
    return result


def _unclip_exempt_parts(max_val: torch.Tensor, w: torch.Tensor, fused, config: dict,
                         grid) -> None:
    """The rows of exempt parts of a fused linear (Phi-3's q and k rows of ``qkv_proj``)
    keep their range: their clip value is each group's own max |w|."""
    if fused is None:
        return
    for part, rows in fused.rows(config).items():
        if part.endswith(CLIP_EXEMPT):
            max_val[rows] = pad_groups(w[rows].float(), grid).abs().amax(dim=2).to(max_val)


def awq_block(ctx, config: QuantizeConfig, grid: "GridConfig | GridFor | None" = None
              ) -> dict[str, torch.Tensor]:
    """Search and apply AWQ scales and clips to one float block in place; return the search
    result as named tensors (``<prev>.awq_scales``, ``<linear>.awq_clip``) on the CPU.

    Runs where the block and its inputs are (CPU or GPU). Per branch one pass over the
    calibration batches gathers the channel means, the search batches and the clip samples of
    every linear input (the last branch stops each batch past the search ones at its output
    linear); the scale search then runs its candidates on the search batches, a candidate of
    a single consuming linear on its captured input."""
    if not ctx.model.arch.sublayers:
        raise ConfigError(f"awq needs the block structure (sublayers) of {ctx.model.arch.family}; "
                          "use --method gptq")
    found = _awq_block(ctx, config, _grid_for(config.grid if grid is None else grid))
    return {k: v.to("cpu", torch.float32, copy=True) for k, v in found.items()}


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _branch_inspector(mixer, mods, normed, kwargs):
    """The branch output over the search batches with trial weights swapped into ``mods``
    (their ``.data`` exchanged, nothing copied)."""
    def inspect(trial: list[torch.Tensor]) -> torch.Tensor:
        saved = [m.weight.data for m in mods]
        try:
            for m, w in zip(mods, trial):
                m.weight.data = w
            outs = [mixer(n, **kw) for n, kw in zip(normed, kwargs)]
            return _joined([out[0] if isinstance(out, tuple) else out for out in outs])
        finally:
            for m, w in zip(mods, saved):
                m.weight.data = w
    return inspect


def _linear_inspector(module, x):
    def inspect(trial: list[torch.Tensor]) -> torch.Tensor:
        out = x @ trial[0].t()
        return out + module.bias if module.bias is not None else out
    return inspect


def apply_saved(layer, arch, index: int, saved: dict[str, torch.Tensor], grid,
                config: dict | None = None) -> None:
    """Re-apply a saved search to a materialized block in place (``config``: the model's,
    where scales fold into parts of fused linears)."""
    prefix = f"{arch.block_prefix}.{index}."
    state = {prefix + k: v for k, v in layer.state_dict().items()}
    new = apply_saved_tensors(arch, index, state, saved, grid, config)
    with torch.inference_mode():
        for name, tensor in new.items():
            target = layer.get_parameter(name[len(prefix):])
            target.data.copy_(tensor.to(target.dtype))


def apply_saved_tensors(arch, index: int, tensors: dict[str, torch.Tensor],
                        saved: dict[str, torch.Tensor] | None, grid: "GridConfig | GridFor",
                        config: dict | None = None) -> dict[str, torch.Tensor]:
    """Re-apply a saved AWQ search (scales, then clips) to one block's named tensors; ``grid``
    (or ``grid(weight name)``) is the grid the clips were searched on; ``config`` (the
    model's) places the scales of a part of a fused linear (``ArchSpec.fused``)."""
    grid_for = _grid_for(grid)
    if saved is None:
        return tensors
    prefix = f"{arch.block_prefix}.{index}."
    work: dict[str, torch.Tensor] = {}

    def get(key: str) -> torch.Tensor:
        if key not in work:
            work[key] = tensors[key].float()
        return work[key]

    for prev, linears in arch.scale_folding:
        s = saved.get(f"{prefix}{prev}.awq_scales")
        if s is None:
            continue
        stored, rows = arch.stored(prev, config or {})  # a part: only its rows of the fused linear
        rows = slice(None) if rows is None else rows
        key = f"{prefix}{stored}.weight"
        w = get(key).clone()
        s = s.to(w.device)  # a saved search is on the CPU, the block may be on a GPU
        if w.dim() == 1:
            w = fold_norm(w, s, arch.norm_offset)
        else:
            w[rows] = w[rows] / s.view(-1, 1)
        work[key] = w
        bias = f"{prefix}{stored}.bias"
        if bias in tensors:
            b = get(bias).clone()
            b[rows] = b[rows] / s
            work[bias] = b
        for lin in linears:
            k = f"{prefix}{lin}.weight"
            work[k] = get(k) * s.view(1, -1)
    for lin in arch.linears:
        clip = saved.get(f"{prefix}{lin}.awq_clip")
        if clip is not None:
            k = f"{prefix}{lin}.weight"
            if grid_for(k) is not None:
                work[k] = apply_clip(get(k), clip, grid_for(k))
    return {**tensors, **{k: v.to(tensors[k].dtype) for k, v in work.items()}}
