"""Orchestration: pick target tensors, run a method over them block by block, lazily."""
from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator

from quantbench.config import (CalibrationOptions, GGUFGridConfig, GridConfig, IntGridConfig,
                               QuantizeConfig, TargetConfig)
from quantbench.errors import ConfigError
from quantbench.lazy import torch
from quantbench.models.loader import Model, describe_passthrough
from quantbench.quant.methods.base import Method
from quantbench.registry import get_method
from quantbench.tensor import QuantizedTensor

log = logging.getLogger(__name__)

Tensors = dict[str, "torch.Tensor | QuantizedTensor"]
OUTSIDE_BLOCKS = "embeddings/head"  # the first step's label: the tensors outside the blocks


def _matches(module: str, targets: TargetConfig) -> bool:
    if targets.include and not any(re.search(p, module) for p in targets.include):
        return False
    return not any(re.search(p, module) for p in targets.exclude)


def select_targets(model: Model, targets: TargetConfig) -> list[str]:
    """Weight tensor names to quantize, in checkpoint order."""
    arch = model.arch
    names: list[str] = []
    for index in range(model.num_blocks):
        for linear in arch.linears:
            module = arch.block_module(index, linear)
            if f"{module}.weight" in model.weights and _matches(module, targets):
                names.append(f"{module}.weight")
    embed = f"{arch.embed}.weight"
    head = f"{arch.lm_head}.weight"
    if targets.embeddings or (targets.lm_head and model.tied_embeddings):
        names.append(embed)
    if targets.lm_head and not model.tied_embeddings and head in model.weights:
        names.append(head)
    if not names:
        raise ConfigError("no tensors match the target selection; check --include/--exclude")
    return names


# The smallest group an open default falls back to (128 → 64 → 32): the smallest that
# GPTQModel, AutoAWQ and llm-compressor ship presets for; below it the scales cost more than
# they save (an fp16 scale per 16 weights is one more bit per weight).
MIN_AUTO_GROUP = 32


def fitted_group_size(default: int, widths: Iterable[int]) -> int | None:
    """The largest of ``default``, ``default / 2``, ... down to ``MIN_AUTO_GROUP`` that divides
    every row width; None when none does.

    Why divide: compressed-tensors and AWQ store whole groups only (their readers refuse a
    shorter last group), GPTQ kernels (Marlin, ExLlama) assume it, and llama.cpp's blocks
    likewise never straddle a row. quantbench's own grids take a shorter last group, so only
    a group the user asks for may leave one (where the format accepts it)."""
    widths = set(widths)
    group = default
    while group >= MIN_AUTO_GROUP:
        if all(w % group == 0 for w in widths):
            return group
        group //= 2
    return None


def fit_default_group(model: Model, names: list[str], default: int) -> int:
    """The group size to use when the user named none: ``default`` if it divides the input
    width of every tensor in ``names``, else :func:`fitted_group_size` (announced in one line
    on the log, naming the widths it does not divide), else ``default`` (a format that needs
    whole groups then refuses it, naming a group size that fits)."""
    widths = {n: model.weights.shape(n)[-1] for n in names if len(model.weights.shape(n)) == 2}
    misfits = {n: w for n, w in widths.items() if w % default}
    group = fitted_group_size(default, widths.values()) if misfits else None
    if group is None:
        return default
    layers = list(dict.fromkeys(n.rsplit(".", 2)[-2] if n.count(".") >= 2 else n
                                for n in misfits))
    sizes = "/".join(str(w) for w in sorted(set(misfits.values())))
    log.warning("group size %d: %d does not divide the %s-wide inputs of %s (pass --group-size "
                "to choose)", group, default, sizes, ", ".join(layers))
    return group


def fit_group_size(model: Model, names: list[str], config: QuantizeConfig) -> QuantizeConfig:
    """``config`` with its group size fitted to the model when it is the method's default
    (``QuantizeConfig.group_size_open``); a group size the user chose is kept as it is."""
    grid = config.grid
    if not (config.group_size_open and isinstance(grid, IntGridConfig)
            and grid.granularity == "group"):
        return config
    group = fit_default_group(model, names, grid.group_size)
    if group == grid.group_size:
        return config
    return replace(config, grid=replace(grid, group_size=group), group_size_open=False)


def check_grid(model: Model, names: list[str], grid: GridConfig) -> None:
    for name in names:
        shape = model.weights.shape(name)
        if len(shape) != 2:
            raise ConfigError(f"{name} has shape {shape}; only 2-D weights can be quantized")
        grid.check_shape(name, shape[0], shape[1])


@dataclass
class QuantizedModel:
    """The result of ``quantize``: source + config + targets, and once :meth:`run` has
    finished, every block's tensors in a :class:`~quantbench.quant.store.BlockStore` (on disk,
    one block in memory at a time). Writing it in one format or several reads the store:
    calibration and quantization run once. A result not yet run runs when first written."""

    source: Model
    config: QuantizeConfig
    targets: list[str]
    method: Method
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"  # where the calibrated maths ran, set when the blocks are pulled
    device_peak_bytes: int | None = None  # a GPU's peak allocated memory during the run
    store: Any = None  # the BlockStore, once run
    # a mixture-of-experts model's calibration tokens per block and expert (calibrated runs)
    expert_tokens: dict[int, list[int]] | None = None

    def expert_coverage(self) -> dict[str, Any] | None:
        """Per-layer expert coverage of the calibration (the manifest's ``experts``): each
        layer's min / median / max tokens routed to an expert and the experts under the
        ``expert_min_tokens`` threshold (``below_threshold``); with a per-expert statistic
        (GPTQ's Hessians, the imatrix) those were force-routed (``force_routed``: statistics
        from all of the layer's tokens), else (AWQ then rounding) they were rounded without
        one."""
        options = self.config.options
        if not self.expert_tokens or not isinstance(options, CalibrationOptions):
            return None
        threshold = max(1, options.expert_min_tokens)
        statistic = self.method.statistic is not None
        layers = []
        for index in sorted(self.expert_tokens):
            counts = self.expert_tokens[index]
            ranked = sorted(counts)
            below = [e for e, n in enumerate(counts) if n < threshold]
            layers.append({"layer": index, "min_tokens": ranked[0],
                           "median_tokens": ranked[len(ranked) // 2],
                           "max_tokens": ranked[-1], "below_threshold": below,
                           "force_routed": below if statistic else []})
        return {"experts": len(self.expert_tokens[min(self.expert_tokens)]),
                "min_tokens_threshold": threshold,
                "fallback": "force-routing: statistics from all of the layer's tokens"
                if statistic else "no fallback: the quantizer takes no per-expert statistic "
                "(AWQ searches scales and clips only for experts some token reached)",
                "router_weighted": options.router_weighted,
                "router": "not quantized (kept in the source dtype)",
                "layers": layers}

    @property
    def seconds(self) -> float:
        return sum(self.timings.values())

    @property
    def done(self) -> bool:
        return self.store is not None

    def run(self, on_step: Callable[[str], None] | None = None) -> "QuantizedModel":
        """Calibrate and quantize every block into the store (once; ``on_step(label)`` after
        each of :meth:`num_steps` steps). Returns self."""
        from quantbench.quant.store import BlockStore

        if self.store is not None:
            return self
        self._announce_long_run()
        store = BlockStore()
        try:
            for label, tensors in self._compute_blocks():
                self._check_finite(tensors)
                store.add(label, tensors)
                if on_step:
                    on_step(label)
        except BaseException:
            store.close()
            raise
        self.store = store
        return self

    def _announce_long_run(self) -> None:
        """A run estimated above a few minutes says so before its first block, with its plan
        and how to make it smaller (``calibration/plan.py`` ``long_run_notice``)."""
        from quantbench.calibration.plan import long_run_notice

        for line in long_run_notice(self.source, self.config, self.method):
            log.warning("%s", line)

    def _check_finite(self, tensors: Tensors) -> None:
        """No method turns a finite weight into NaN/Inf, or NaN into a finite code, silently:
        a quantized tensor's stored scales (or a GGUF block's) must be finite, and so must every
        tensor passed through, unless it came so from the source (``--allow-non-finite``)."""
        from quantbench.errors import QuantbenchError
        from quantbench.finite import count_non_finite

        for name, value in tensors.items():
            if isinstance(value, QuantizedTensor):
                bad = [p for s in value.slices() for p in s.grid.non_finite_parts(s)]
                if bad:
                    raise QuantbenchError(
                        f"quantizing {name} with {self.config.method} gave non-finite {bad[0]} "
                        f"(NaN/Inf), likely from {self._likely_cause(name, value)}; nothing was "
                        "written: check the source weights' magnitudes and the calibration data")
            elif count_non_finite(value) and name not in self.source.weights.non_finite:
                raise QuantbenchError(
                    f"{name} became non-finite (NaN/Inf) while {self.config.method} prepared "
                    "its block; nothing was written: check the calibration data")

    def _likely_cause(self, name: str, qt: QuantizedTensor) -> str:
        if self.method.needs_calibration and self.source.arch.block_of(name) is not None:
            return ("a calibration statistic (Hessian, activation scales) that is not finite, "
                    "e.g. an fp16 overflow")
        return f"scales beyond the range of {str(qt.scales.dtype).replace('torch.', '')}" \
            if qt.scales.numel() else "block scales beyond the range of fp16"

    def _convert(self, name: str, tensor: torch.Tensor) -> "torch.Tensor | QuantizedTensor":
        if name not in self._target_set:
            return tensor
        start = time.perf_counter()
        qt = self.method.quantize_weight(name, tensor)
        self.timings[name] = time.perf_counter() - start
        return qt

    @property
    def _target_set(self) -> set[str]:
        return set(self.targets)

    def iter_blocks(self) -> Iterator[tuple[str, Tensors]]:
        """Yield ``(label, {tensor name: Tensor or QuantizedTensor})``, a block at a time;
        non-block tensors (embeddings, final norm, lm_head) come first. Runs first if needed."""
        yield from self.run().store

    def _compute_blocks(self) -> Iterator[tuple[str, Tensors]]:
        weights = self.source.weights
        others = self.source.other_tensor_names()
        yield OUTSIDE_BLOCKS, {n: self._convert(n, weights.get(n)) for n in others}
        if self.method.needs_calibration:
            yield from self._calibrated_blocks()
            return
        for index in range(self.source.num_blocks):
            block = {n: weights.get(n) for n in self.source.block_tensor_names(index)}
            block = self.method.transform_block(self.source, index, block)  # e.g. a saved AWQ search
            yield f"block {index}", {n: self._convert(n, t) for n, t in block.items()}

    def _calibrated_blocks(self) -> Iterator[tuple[str, Tensors]]:
        from quantbench.calibration.data import CalibrationSpec, sample_windows
        from quantbench.calibration.pipeline import run_pipeline
        from quantbench.devices import describe, resolve_device

        o = self.config.options
        spec = CalibrationSpec(o.calib_samples, o.calib_len, o.calib_seed, o.calib_data,
                               o.calib_chat_template)
        windows = sample_windows(self.source.tokenizer(), spec)
        start = time.perf_counter()
        device = resolve_device(o.device)
        self.device = describe(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if self.source.arch.experts is not None:
            self.expert_tokens = {}
        for index, tensors in run_pipeline(self.source, windows, self._target_set,
                                           self.method, o.batch_size, device=device,
                                           expert_tokens=self.expert_tokens):
            self.timings[f"block {index}"] = time.perf_counter() - start
            start = time.perf_counter()
            yield f"block {index}", tensors
        coverage = self.expert_coverage()
        if coverage and any(layer["below_threshold"] for layer in coverage["layers"]):
            log.warning("%s; more calibration (--calib-samples) reaches more experts",
                        describe_coverage(coverage))
        if device.type == "cuda":
            self.device_peak_bytes = int(torch.cuda.max_memory_allocated(device))

    def num_steps(self) -> int:
        """Calls of ``on_step``: the tensors outside the blocks, then one per block."""
        return self.source.num_blocks + 1

    def tensor_names(self) -> list[str]:
        return self.source.weights.names()


@contextlib.contextmanager
def quantize_progress(qmodel: QuantizedModel, description: str, enabled: bool | None = None
                      ) -> Iterator[Callable[[str], None]]:
    """The ``on_step`` of quantizing or writing ``qmodel``, counted in decoder blocks
    (``12/30 blocks``: the count says how many are done, so no 0-based block index is shown
    beside it); the first step, the tensors outside the blocks, shows by name at 0 blocks."""
    from quantbench.progress import block_progress

    with block_progress(qmodel.source.num_blocks, description, enabled, unit="blocks") as step:
        yield lambda label: step("(embeddings, norm, head)", 0) if label == OUTSIDE_BLOCKS else step()


def make_config(method: str = "zeropoint", bits: int | None = None,
                group_size: int | None = None, symmetric: bool | None = None,
                targets: TargetConfig | None = None, gguf_type: str | None = None,
                **options: Any) -> QuantizeConfig:
    """Build a ``QuantizeConfig``; bits, group size and grid kind default to what the method
    implies (4-bit g128 for the integer methods, NF4 block 64, LLM.int8 per row; a default
    group size that does not divide the model's rows is lowered by ``quantize``); with
    ``gguf_type`` (a llama.cpp mixture such as ``Q4_K_M``) the grid is that GGUF type and
    every 2-D tensor, embeddings and lm_head included, is a target."""
    method_cls = get_method(method)
    opts = method_cls.build_options(**options)
    targets = TargetConfig() if targets is None else targets
    if not isinstance(targets, TargetConfig):
        raise ConfigError(f"targets must be a TargetConfig (e.g. TargetConfig(include="
                          f"('mlp',))), got {targets!r}")
    if symmetric is not None and not isinstance(symmetric, bool):
        raise ConfigError(f"symmetric must be true, false or None (the method's own), got "
                          f"{symmetric!r}")
    if gguf_type is not None:
        return QuantizeConfig(method=method, grid=_gguf_grid(method_cls, gguf_type, bits,
                                                             group_size, symmetric),
                              targets=replace(targets, embeddings=True, lm_head=True),
                              options=opts)
    bits = method_cls.default_bits if bits is None else bits
    open_group = group_size is None  # quantize() may fit the default to the model's rows
    group_size = method_cls.default_group_size if group_size is None else group_size
    grid = method_cls.make_grid(bits, group_size, symmetric, opts)
    return QuantizeConfig(method=method, grid=grid, targets=targets, options=opts,
                          group_size_open=open_group)


def _gguf_grid(method_cls, gguf_type: str, bits: int | None, group_size: int | None,
               symmetric: bool | None) -> GGUFGridConfig:
    """GGUF types fix their own widths and blocks; every 2-D tensor is stored in one."""
    if not method_cls.gguf_capable:
        raise ConfigError(f"{method_cls.name} cannot target GGUF types; use --method rtn, "
                          "imatrix, gptq or awq with --type")
    if bits is not None or group_size is not None or symmetric is not None:
        raise ConfigError(f"--type {gguf_type} fixes bits, blocks and zero-points; drop "
                          "--bits/--group-size/--zero-point")
    return GGUFGridConfig(gguf_type)


def _finite_targets(model: Model, names: list[str]) -> list[str]:
    """With ``allow_non_finite`` (``--allow-non-finite``), the targets holding NaN/Inf are
    kept as they are, not quantized: no grid may turn NaN into a finite code. Reads each
    target once (only then); without the opt-in such a tensor is refused when read."""
    weights = model.weights
    if not weights.allow_non_finite:
        return names
    for name in names:
        weights.get(name)  # counts its non-finite values into weights.non_finite
    kept = [n for n in names if n in weights.non_finite]
    for name in kept:
        log.warning("not quantizing %s: it holds %d non-finite values (kept as it is)", name,
                    weights.non_finite[name])
    finite = [n for n in names if n not in weights.non_finite]
    if not finite:
        raise ConfigError("every tensor selected for quantization holds NaN/Inf values; "
                          "nothing can be quantized")
    return finite


def _check_calibration_inputs(model: Model, options: CalibrationOptions) -> None:
    """The tokenizer and the calibration text load now: a missing or damaged one is refused
    before any work, not after the first block (a Hub dataset is fetched when it is used)."""
    from quantbench.calibration.data import load_calibration_docs

    model.tokenizer()
    if options.calib_data is None or not options.calib_data.startswith("hf:"):
        load_calibration_docs(options.calib_data)


def quantize(model: Model, config: QuantizeConfig) -> QuantizedModel:
    """Check the combination, then return a lazy ``QuantizedModel``; a default group size is
    first fitted to the model's rows (:func:`fit_group_size`, announced)."""
    method_cls = get_method(config.method)
    method = method_cls(config)
    names = _finite_targets(model, select_targets(model, config.targets))
    if (fitted := fit_group_size(model, names, config)) is not config:
        config, method = fitted, method_cls(fitted)
    check_grid(model, names, config.grid)
    if isinstance(config.options, CalibrationOptions):  # refuse a missing device before work
        from quantbench.devices import resolve_device
        resolve_device(config.options.device)
    method.prepare(model, names)  # e.g. a GGUF mixture resolved to one type per tensor
    if method.needs_calibration:
        _check_calibration_inputs(model, config.options)
    log.info("quantizing %d tensors of %s with %s %s", len(names), model.source,
             config.method, config.grid.describe())
    if kept := model.passthrough_report():  # a multimodal model's vision tower, projector
        log.info("%s", describe_passthrough(kept))
    return QuantizedModel(source=model, config=config, targets=names, method=method)


def describe_coverage(coverage: dict[str, Any]) -> str:
    """One line of a manifest's ``experts`` coverage (card, ``inspect``, the run's log)."""
    layers = coverage["layers"]
    starved = [(layer["layer"], layer.get("below_threshold", layer["force_routed"]))
               for layer in layers if layer.get("below_threshold", layer["force_routed"])]
    text = (f"{coverage['experts']} experts per layer; calibration tokens per expert min "
            f"{min(layer['min_tokens'] for layer in layers)}, median of layer medians "
            f"{sorted(layer['median_tokens'] for layer in layers)[len(layers) // 2]}")
    if not starved:
        return text + f"; every expert reached {coverage['min_tokens_threshold']}+ tokens"
    shown = "; ".join(f"layer {i}: {', '.join(map(str, e))}" for i, e in starved[:4])
    more = f" (+{len(starved) - 4} more layers)" if len(starved) > 4 else ""
    forced = any(layer["force_routed"] for layer in layers)
    how = ("force-routed: statistics from all of the layer's tokens" if forced
           else coverage["fallback"])
    return (text + f"; under {coverage['min_tokens_threshold']} tokens ({how}): "
            f"{shown}{more}")
