"""The EXL2 measurement: for every residual branch of every block (a *slot*) and every
candidate setting of its linears, the exact bit cost (FORMATS.md §4.6) and the relative output
error ``mean over tokens of ‖y_q − y‖ / ‖y‖`` of the block's hidden state after the branch,
with the branch's linears quantized by GPTQ on float inputs. exllamav2's ``measure.py`` takes
the ratio per window (``‖·‖_F`` over all tokens); per token it is here because a few tokens
with massive activations (SmolLM2 from block 12 on) set a window's norm and hide the error of
every other token — the allocator then starved those blocks (2-bit MLPs at a 4.0 bpw target,
KLD 0.40 against 0.21 for uniform GPTQ; see benchmarks/results/exl2_smollm2.json).

The result is data (:class:`Measurement`, JSON): saved after every block, so an interrupted
pass resumes where it stopped, and reusable for any bpw target without measuring again
(:meth:`Measurement.allocate`). An error that has no value (NaN: not measured, or not
measurable) is written as ``null`` — JSON has no NaN — and read back as NaN. It names the model it was made on by a digest of the target
shapes and two weights, and refuses to be applied to another.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from quantbench.config import EXL2GridConfig
from quantbench.errors import ConfigError, QuantbenchError
from quantbench.jsonfile import dumps
from quantbench.lazy import torch
from quantbench.quant.exl2.grid import total_bits
from quantbench.quant.exl2.optimize import Allocation, bounds, solve
from quantbench.quant.exl2.presets import LADDER, branch_candidates

log = logging.getLogger(__name__)

KIND = "quantbench-exl2-measurement"
VERSION = 2  # 2: per-token relative errors (1: per-window, skewed by massive activations)


@dataclass
class Candidate:
    settings: dict[str, str]   # weight name → mix (exllamav2 notation)
    bits: int
    error: float = float("nan")


@dataclass
class Slot:
    block: int
    branch: str                # the mixer: self_attn, mlp
    numel: int
    candidates: list[Candidate]


@dataclass
class Measurement:
    model: dict[str, Any]
    calibration: dict[str, Any]
    ladder: list[str] = field(default_factory=lambda: list(LADDER))
    slots: list[Slot] = field(default_factory=list)
    complete: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, "version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "measurement") -> "Measurement":
        if not isinstance(data, dict) or data.get("kind") != KIND:
            raise QuantbenchError(f"{source} is not a quantbench EXL2 measurement")
        if isinstance(data.get("version", 0), bool) or not isinstance(data.get("version", 0),
                                                                        int):
            raise QuantbenchError(f"{source} is damaged (version {data['version']!r}); "
                                  "measure again with a new --measurement file")
        if data.get("version", 0) > VERSION:
            raise QuantbenchError(f"{source} was written by a newer quantbench (measurement "
                                  f"version {data['version']}); upgrade quantbench")
        if data.get("version", 0) < VERSION:
            raise QuantbenchError(f"{source} holds errors measured the old way (per window, "
                                  f"version {data.get('version', 0)}); measure again with a "
                                  "new --measurement file")
        try:
            slots = [Slot(s["block"], s["branch"], s["numel"],
                          [Candidate(dict(c["settings"]), int(c["bits"]),
                                     float("nan") if c["error"] is None else float(c["error"]))
                           for c in s["candidates"]]) for s in data["slots"]]
            return cls(dict(data["model"]), dict(data["calibration"]), list(data["ladder"]),
                       slots, bool(data["complete"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise QuantbenchError(f"{source} is damaged ({type(exc).__name__}: {exc}); "
                                  "measure again") from exc

    @classmethod
    def load(cls, path: Path) -> "Measurement":
        from quantbench.inputs import read_json_object

        data = read_json_object(Path(path), QuantbenchError, "measure again with a new "
                                "--measurement file")
        return cls.from_dict(data, str(path))

    def save(self, path: Path) -> None:
        from quantbench.formats.manifest import write_json_atomic

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(path), _nulls(self.to_dict()))

    def measured_blocks(self) -> set[int]:
        return {s.block for s in self.slots}

    def check_model(self, identity: dict[str, Any], source: str) -> None:
        """Refuse a measurement of another model (or of another target selection)."""
        if self.model.get("digest") != identity["digest"]:
            m = self.model
            raise ConfigError(
                f"{source} measures another model or target selection ({m.get('source')}: "
                f"{m.get('architecture')}, {m.get('blocks')} blocks, {m.get('targets')} "
                f"linears) than {identity['source']} ({identity['architecture']}, "
                f"{identity['blocks']} blocks, {identity['targets']} linears); measure this "
                "one: name a new --measurement file")

    def check_resumable(self, calibration: dict[str, Any], ladder: list[str],
                        source: str) -> None:
        if self.calibration != calibration or self.ladder != ladder:
            raise ConfigError(f"{source} is an unfinished measurement with other calibration "
                              "settings or candidates; rerun with the same settings to resume "
                              "it, or name a new --measurement file")

    def allocate(self, target_bpw: float) -> tuple[dict[str, EXL2GridConfig], dict[str, Any]]:
        """Each tensor's mix for ``target_bpw`` and a report (achieved bpw, predicted
        error, the solver's slack)."""
        if not self.complete:
            raise ConfigError("the measurement is unfinished; run it to the end first")
        costs = [[c.bits for c in s.candidates] for s in self.slots]
        errors = [[c.error for c in s.candidates] for s in self.slots]
        numel = sum(s.numel for s in self.slots)
        check_target(target_bpw, costs, numel)
        alloc = solve(costs, errors, int(target_bpw * numel))
        settings: dict[str, EXL2GridConfig] = {}
        for slot, k in zip(self.slots, alloc.choice):
            for name, desc in slot.candidates[k].settings.items():
                settings[name] = EXL2GridConfig.from_desc(desc)
        return settings, report(alloc, target_bpw, numel, len(self.slots))


def _nulls(data: dict[str, Any]) -> dict[str, Any]:
    """Errors without a value (NaN: a candidate not measured yet, as an unfinished measurement
    holds by design, or a measurement that gave none) as JSON ``null``; read back as NaN."""
    for slot in data["slots"]:
        for cand in slot["candidates"]:
            if not math.isfinite(cand["error"]):
                cand["error"] = None
    return data


def report(alloc: Allocation, target_bpw: float, numel: int, slots: int) -> dict[str, Any]:
    return {"target_bpw": target_bpw, "achieved_bpw": round(alloc.bits / numel, 6),
            "bits": alloc.bits, "weights": numel, "predicted_error": alloc.error,
            "mean_error": alloc.error / max(slots, 1),
            "solver_slack_bpw": round(alloc.slack_bits / numel, 6)}


def check_target(target_bpw: float, costs: list[list[int]], numel: int) -> None:
    """A clear refusal for a target no choice can meet (or that every choice undercuts)."""
    cheapest, dearest = (b / numel for b in bounds(costs))
    if target_bpw < cheapest:
        raise ConfigError(f"--bpw {target_bpw:g} is below the cheapest EXL2 setting for this "
                          f"model ({cheapest:.3f} bpw: every layer at its fewest bits, scales "
                          f"and permutation included); use --bpw {_up(cheapest)} or more")
    if target_bpw > dearest:
        raise ConfigError(f"--bpw {target_bpw:g} is above the dearest EXL2 setting for this "
                          f"model ({dearest:.3f} bpw: every layer at 8 bits); use --bpw "
                          f"{_down(dearest)} or less")


def _up(x: float) -> str:
    return f"{int(x * 100 + 0.999999) / 100:.2f}"


def _down(x: float) -> str:
    return f"{int(x * 100) / 100:.2f}"


# -- which slots a model has, and their costs without measuring ---------------------------

def model_identity(model: Any, targets: list[str]) -> dict[str, Any]:
    """What a measurement must match: a digest of the target names and shapes and of the
    first and last target weights."""
    shapes = [[n, list(model.weights.shape(n))] for n in targets]
    digest = hashlib.sha256(dumps(shapes).encode())
    for name in dict.fromkeys([targets[0], targets[-1]]):
        digest.update(model.weights.get(name).contiguous().view(torch.uint8).numpy().tobytes())
    return {"source": str(model.source), "architecture": model.config.get("model_type"),
            "blocks": model.num_blocks, "targets": len(targets), "digest": digest.hexdigest()}


def branch_linears(model: Any, index: int, targets: set[str]) -> list[tuple[str, list[str]]]:
    """``(mixer, [target weight names])`` per residual branch of block ``index``."""
    arch = model.arch
    if not arch.sublayers:
        raise ConfigError(f"EXL2 measurement runs branch by branch; the {arch.family} mapping "
                          "declares no sublayers")
    out = []
    for sub in arch.sublayers:
        names = [f"{arch.block_module(index, lin)}.weight" for lin in arch.linears
                 if lin.startswith(sub.mixer + ".")]
        names = [n for n in names if n in targets]
        if names:
            out.append((sub.mixer, names))
    return out


def plan_slots(model: Any, targets: list[str], ladder: list[str]) -> list[Slot]:
    """Every slot with its candidates and their exact costs (errors not yet measured)."""
    wanted = set(targets)
    slots = []
    for index in range(model.num_blocks):
        for branch, names in branch_linears(model, index, wanted):
            shapes = {n: model.weights.shape(n) for n in names}
            cands = []
            for cand in branch_candidates(names, tuple(ladder)):
                bits = sum(total_bits(EXL2GridConfig.from_desc(d), shapes[n][1], shapes[n][0])
                           for n, d in cand.items())
                cands.append(Candidate(cand, bits))
            slots.append(Slot(index, branch, sum(o * i for o, i in shapes.values()), cands))
    return slots


# -- the measurement pass -------------------------------------------------------------------

QuantizeFn = Callable[["torch.Tensor", Any, "list[EXL2GridConfig]"], "list[torch.Tensor]"]
SWEEP_ELEMENTS = 1 << 25   # weights per stacked GPTQ sweep (copies of one linear, one per mix)


def measure(model: Any, captured: Any, measurement: Measurement, planned: list[Slot],
            quantize: QuantizeFn, save: Callable[[Measurement], None],
            prepare: Callable[[torch.Tensor], Any] = lambda h: h) -> Measurement:
    """Measure every block not yet in ``measurement`` (earlier ones only run forward, to
    make the inputs of the next), saving after each. ``captured`` (the calibration layer's
    :class:`~quantbench.calibration.pipeline.Captured`) holds block 0's float inputs and every
    block's layer arguments; the blocks are walked by the pipeline's one block loop.
    ``quantize(weight, prepare(hessian), mixes)`` returns the dequantized weight for each mix
    (``prepare`` runs once per input Hessian, e.g. its factorisation, shared by every setting
    tried on that input)."""
    from quantbench.calibration.blocks import _skeleton, walk_blocks

    done = measurement.measured_blocks()
    by_block: dict[int, list[Slot]] = {}
    for slot in planned:
        by_block.setdefault(slot.block, []).append(slot)

    def visit(ctx: Any) -> tuple[list[Slot], list[torch.Tensor]]:
        todo = [] if ctx.index in done else by_block.get(ctx.index, [])
        return todo, _block(model, ctx.layer, ctx.index, ctx.hidden, ctx.kwargs, todo,
                            quantize, prepare)

    device = captured.hidden[0].device
    for index, todo in walk_blocks(model, _skeleton(model), captured, visit, device):
        if index not in done:
            measurement.slots += todo
            measurement.complete = index == model.num_blocks - 1
            save(measurement)
            log.info("EXL2 measurement: block %d of %d", index + 1, model.num_blocks)
    measurement.complete = True
    return measurement


def _block(model: Any, layer: torch.nn.Module, index: int, x: list[torch.Tensor],
           kwargs: list[dict[str, Any]], slots: list[Slot], quantize: QuantizeFn,
           prepare: Callable[[torch.Tensor], Any]) -> list[torch.Tensor]:
    """Measure ``slots`` (this block's, possibly none) branch by branch on float inputs;
    return the float block's output."""
    todo = {s.branch: s for s in slots}
    with torch.inference_mode():
        for sub in model.arch.sublayers:
            x = _branch(model, layer, index, sub, x, kwargs, todo.get(sub.mixer), quantize,
                        prepare)
    return x


def _branch(model: Any, layer: torch.nn.Module, index: int, sub: Any, x: list[torch.Tensor],
            kwargs: list[dict[str, Any]], slot: Slot | None, quantize: QuantizeFn,
            prepare: Callable[[torch.Tensor], Any]) -> list[torch.Tensor]:
    """``x + mixer(norm(x))`` in float (a declared post-branch norm applied to the branch);
    measure ``slot``'s candidates on the way (errors relative to the hidden state after it)."""
    from quantbench.calibration.blocks import call_mixer, residual_add

    norm, mixer = layer.get_submodule(sub.norm), layer.get_submodule(sub.mixer)
    kw = kwargs if sub.takes_layer_kwargs else [{} for _ in x]
    normed = [norm(h) for h in x]
    ref = [call_mixer(mixer, n, k) for n, k in zip(normed, kw)]
    y = residual_add(layer, sub, x, ref)
    if slot is not None:
        _measure_branch(model, layer, index, sub, normed, kw, ref, y, slot, quantize, prepare)
    return y


def token_norms(y: torch.Tensor) -> torch.Tensor:
    """``‖y_t‖`` of every token of a hidden state ``[batch, tokens, hidden]``."""
    return torch.linalg.vector_norm(y.float(), dim=-1).clamp_min(1e-12)


def token_errors(out: torch.Tensor, ref: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``‖out_t − ref_t‖ / ‖y_t‖`` per token, flat. Per token, not per window: a few tokens
    with massive activations (SmolLM2 from block 12 on) would otherwise set a window's norm
    and hide the error of every other token."""
    return (torch.linalg.vector_norm((out - ref).float(), dim=-1) / norms).flatten()


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _measure_branch(model, layer, index, sub, normed, kw, ref, y, slot: Slot,
                    quantize: QuantizeFn, prepare: Callable[[torch.Tensor], Any]) -> None:
    from quantbench.calibration.collectors import HessianCollector
    from quantbench.calibration.blocks import call_mixer, capture_linear_inputs

    arch = model.arch
    prefix = f"{arch.block_prefix}.{index}."
    linear_of = {n: n[len(prefix):-len(".weight")] for n in slot.candidates[0].settings}
    mixer = layer.get_submodule(sub.mixer)
    groups = [g for g in arch.sequential_groups if g[0].startswith(sub.mixer + ".")]
    heads = {g[0]: layer.get_submodule(g[0]) for g in groups
             if any(lin in linear_of.values() for lin in g)}
    seen = capture_linear_inputs(mixer, heads, normed, kw)
    hessians = {}
    for g in groups:
        if g[0] not in seen:
            continue
        collector = HessianCollector(heads[g[0]].in_features, device=normed[0].device)
        for f in seen[g[0]]:
            collector.add(f)
        prepared = prepare(collector.result())
        for lin in g:
            hessians[lin] = prepared
    del seen
    floats = {n: layer.get_submodule(lin).weight.detach().clone() for n, lin in linear_of.items()}
    uses = Counter(item for cand in slot.candidates for item in cand.settings.items())
    cache: dict[tuple[str, str], torch.Tensor] = {}   # only settings still to be used
    norms = [token_norms(t) for t in y]
    post = _identity
    if sub.post_norm is not None:  # the branch output as the residual stream receives it
        post = layer.get_submodule(sub.post_norm)
        ref = [post(r) for r in ref]
    for cand in slot.candidates:
        for name, desc in cand.settings.items():
            if (name, desc) not in cache:  # this mix and the next few of the linear at once
                todo = [desc] + [d for (n, d) in uses if n == name and d != desc
                                 and (n, d) not in cache and uses[(n, d)] > 0]
                todo = todo[:max(1, SWEEP_ELEMENTS // floats[name].numel())]
                weight = floats[name].to(model.weights.dtype(name))
                grids = [EXL2GridConfig.from_desc(d) for d in todo]
                for d, deq in zip(todo, quantize(weight, hessians[linear_of[name]], grids)):
                    cache[(name, d)] = deq.to(torch.float16)
            layer.get_submodule(linear_of[name]).weight.data.copy_(cache[(name, desc)])
        ratios = [token_errors(post(call_mixer(mixer, n, k)), r, d)
                  for n, k, r, d in zip(normed, kw, ref, norms)]
        cand.error = float(torch.cat(ratios).mean())
        for item in cand.settings.items():
            uses[item] -= 1
            if not uses[item]:
                del cache[item]
    for name, lin in linear_of.items():
        layer.get_submodule(lin).weight.data.copy_(floats[name])
