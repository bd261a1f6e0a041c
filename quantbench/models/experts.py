"""Mixture-of-experts blocks: the routed-experts module quantbench runs, and a family spec
expanded to one model's experts.

transformers 5 holds a block's experts as two fused 3-D parameters (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``) inside one module, which no method or format can address per expert.
quantbench swaps that module for :class:`RoutedExperts` — the same forward, term for term
(experts in ascending order, each on the tokens routed to it, its output scaled by the token's
routing weight and added with ``index_add_``), over one ``nn.Linear`` per expert projection
named as older checkpoints store them (``mlp.experts.<e>.gate_proj``). Every method then
quantizes an expert like any linear, the calibration hooks on an expert's linears see exactly
the tokens the router sends it, and the evaluator runs the same module on read-back weights.

:func:`expand` names every expert's linears, true-sequential groups and shapes for a model's
expert count (``ArchSpec.for_config``); :func:`fused_views` reads a fused checkpoint as
per-expert tensors (views of the stored bytes, nothing copied).
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING

from quantbench.errors import ModelLoadError
from quantbench.lazy import torch

if TYPE_CHECKING:
    from quantbench.models.archspec import ArchSpec


class ExpertMLP(torch.nn.Module):
    """One expert: ``down(act(gate(x)) · up(x))``."""

    def __init__(self, hidden: int, intermediate: int, act_fn):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = torch.nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = torch.nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = act_fn

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        """What ``down_proj`` receives for inputs ``x``."""
        return self.act_fn(self.gate_proj(x)) * self.up_proj(x)


class RoutedExperts(torch.nn.ModuleList):
    """transformers' fused experts module (``MixtralExperts``, ``Qwen3MoeExperts``) as one
    :class:`ExpertMLP` per expert; called as it is (``hidden [T, H]``, ``top_k_index [T, k]``,
    ``top_k_weights [T, k]``). While ``recording`` is a dict, each call appends every hit
    expert's routing weights (``[tokens routed to it]``, in the order its linears see the
    tokens) under its index: the calibration layer's token counts and router weighting."""

    def __init__(self, count: int, hidden: int, intermediate: int, act_fn):
        super().__init__([ExpertMLP(hidden, intermediate, act_fn) for _ in range(count)])
        self.recording: dict[int, list[torch.Tensor]] | None = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        count = len(self)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=count + 1)
            mask = mask.permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for index in hit:
            e = int(index[0])
            if e == count:
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            expert = self[e]
            out = expert.down_proj(expert.inner(hidden_states[token_idx]))
            weights = top_k_weights[token_idx, top_k_pos, None]
            if self.recording is not None:
                self.recording.setdefault(e, []).append(weights[:, 0].detach())
            final.index_add_(0, token_idx, (out * weights).to(final.dtype))
        return final


def install_routed_experts(net: torch.nn.Module, arch: "ArchSpec") -> torch.nn.Module:
    """Replace every block's fused experts module in ``net`` (a transformers model, real or on
    the meta device) by a :class:`RoutedExperts` on the same device; a no-op for a dense
    family. The new linears are uninitialised: load the weights after."""
    spec = arch.experts
    if spec is None:
        return net
    layers = net.get_submodule(arch.block_prefix)
    for layer in layers:
        try:
            old = layer.get_submodule(spec.module)
        except AttributeError:
            continue  # a dense layer of a partly sparse model
        if isinstance(old, RoutedExperts):
            continue
        device = next(old.parameters()).device
        count, inter, hidden = old.down_proj.shape[0], old.down_proj.shape[2], \
            old.down_proj.shape[1]
        with torch.device(device):
            new = RoutedExperts(count, hidden, inter, old.act_fn)
        parent, _, name = spec.module.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, name, new)
    return net


def expand(arch: "ArchSpec", config: dict) -> "ArchSpec":
    """``arch`` with its experts named for ``config``'s expert count: the linears (attention
    first, then each expert's gate, up, down), true-sequential groups (each expert's gate+up
    share its routed input; downs after every gate/up), shapes, and the router among the
    modules validated but never quantized."""
    spec = arch.experts
    count_key = spec.count_key(config)
    count = _positive(config, count_key, "the number of experts")
    top_k = _positive(config, spec.top_k_key, "experts per token")
    _positive(config, spec.size_key, "the experts' intermediate size")
    if top_k > count:
        raise ModelLoadError(f"config.json {spec.top_k_key}={top_k} routes each token to more "
                             f"experts than {count_key}={count}; fix the config")
    _check_all_sparse(config)
    proj = [p for p, _ in spec.projections]
    gate, up, down = proj
    linears = [spec.linear(e, p) for e in range(count) for p in proj]
    groups = [(spec.linear(e, gate), spec.linear(e, up)) for e in range(count)] + \
        [(spec.linear(e, down),) for e in range(count)]
    shapes = [(spec.linear(e, p), (spec.size_key, "hidden_size") if p != down
               else ("hidden_size", spec.size_key)) for e in range(count) for p in proj]
    shapes.append((spec.router, (count_key, "hidden_size")))
    # AWQ: the norm's scales fold into the router (exact: it stays in float) and every
    # expert's gate/up, each expert's up into its down
    folding = [(mlp_norm, (spec.router, *(spec.linear(e, p) for e in range(count)
                                          for p in (gate, up))))
               for mlp_norm in {s.norm for s in arch.sublayers if s.mixer == spec.mixer}]
    folding += [(spec.linear(e, up), (spec.linear(e, down),)) for e in range(count)]
    attention = [s for s in arch.sublayers if s.mixer != spec.mixer]
    mlp = next(s for s in arch.sublayers if s.mixer == spec.mixer)
    return replace(
        arch, num_experts=count,
        linears=(*arch.linears, *linears),
        sequential_groups=(*arch.sequential_groups, *groups),
        scale_folding=(*arch.scale_folding, *folding),
        shapes=(*arch.shapes, *shapes),
        kept=(*arch.kept, spec.router),
        sublayers=(*attention, replace(mlp, inputs=(), output=None)),
    )


def _positive(config: dict, key: str, what: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelLoadError(f"config.json {key} ({what}) must be a positive integer, not "
                             f"{value!r}; fix the config")
    return value


def _check_all_sparse(config: dict) -> None:
    """Qwen-MoE configs can make some layers dense (``mlp_only_layers``,
    ``decoder_sparse_step``); no released model does, and quantbench supports only models
    whose every layer routes experts."""
    if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step") or 1) != 1:
        raise ModelLoadError("config.json makes some layers dense (mlp_only_layers / "
                             "decoder_sparse_step), which quantbench does not support yet; "
                             "only models whose every layer routes experts")


_FUSED = re.compile(r"^(?P<module>.+\.experts)\.(?P<param>gate_up_proj|down_proj)$")


def fused_views(arch: "ArchSpec", shapes: dict[str, tuple[int, ...]]
                ) -> dict[str, list[tuple[str, int, tuple[int, int]]]]:
    """``{stored fused name: [(per-expert name, element offset, 2-D shape), ...]}`` for the
    fused 3-D expert parameters among ``shapes`` (transformers 5's layout): ``gate_up_proj
    [E, 2I, H]`` → ``<e>.gate_proj.weight`` (rows ``:I``) and ``<e>.up_proj.weight`` (rows
    ``I:``), ``down_proj [E, H, I]`` → ``<e>.down_proj.weight``. Each piece is contiguous in
    the stored tensor. Refuses a fused parameter that is not 3-D or splits unevenly."""
    spec = arch.experts
    if spec is None:
        return {}
    gate, up, down = (p for p, _ in spec.projections)
    out: dict[str, list[tuple[str, int, tuple[int, int]]]] = {}
    for name, shape in shapes.items():
        m = _FUSED.match(name)
        if m is None or not m["module"].endswith(spec.module):
            continue
        if len(shape) != 3 or (m["param"] == "gate_up_proj" and shape[1] % 2):
            raise ModelLoadError(f"tensor {name} has shape {list(shape)}; a fused expert "
                                 "parameter is [experts, rows, columns]"
                                 f"{' with an even row count (gate, then up)' if m['param'] == 'gate_up_proj' else ''}"
                                 ": the checkpoint is damaged or its config does not belong "
                                 "to it")
        count, rows, cols = shape
        pieces = []
        for e in range(count):
            base = e * rows * cols
            if m["param"] == "gate_up_proj":
                half = rows // 2
                pieces.append((f"{m['module']}.{e}.{gate}.weight", base, (half, cols)))
                pieces.append((f"{m['module']}.{e}.{up}.weight", base + half * cols,
                               (half, cols)))
            else:
                pieces.append((f"{m['module']}.{e}.{down}.weight", base, (rows, cols)))
        out[name] = pieces
    return out
