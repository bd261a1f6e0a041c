"""``exl2``: exllamav2's quantization on the shared calibration layer.

With ``bpw`` (``--bpw 4.65``) a measurement pass first records, per block branch and candidate
setting, the exact bit cost and the relative output error
(:mod:`quantbench.quant.exl2.measure`); the solver (:mod:`quantbench.quant.exl2.optimize`)
picks one candidate per branch for the least total error within ``bpw × weights`` bits; then
GPTQ with act-order quantizes every linear onto its mix on the true-sequential pipeline. The
measurement is JSON, saved after every block (``measurement``, by default in the quantbench
cache keyed by model and calibration), so a second target reuses it and an interrupted pass
resumes. Without ``bpw`` every linear gets one width (``--bits``, ``--group-size``).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantbench.config import CalibrationOptions, EXL2GridConfig, GridConfig, QuantizeConfig
from quantbench.errors import ConfigError
from quantbench.jsonfile import dumps, with_nulls
from quantbench.lazy import torch
from quantbench.options import option
from quantbench.quant.exl2.gptq import EXL2Params, exl2_quantize_many, prepare_hessian
from quantbench.quant.grids.exl2 import BPW, GROUP_ROWS
from quantbench.quant.methods.base import Method
from quantbench.quant.methods.gptq import DAMP
from quantbench.ranges import Range
from quantbench.registry import register_method
from quantbench.tensor import QuantizedTensor

log = logging.getLogger(__name__)

MEASUREMENT_FILE = "exl2_measurement.json"   # written beside the weights
STRATEGY_FILE = "exl2_strategy.json"


@dataclass(frozen=True)
class EXL2Options(CalibrationOptions):
    bpw: float | None = option(None, allowed=BPW, help=(
        "Target bits per weight over the decoder linears; a measurement picks each layer's "
        "mix of 2-8 bit widths (e.g. 4.65)."))
    measurement: str | None = option(None, help=(
        "The measurement JSON to reuse (complete), resume (unfinished) or write (absent); "
        "default: one in the quantbench cache."))
    measure_samples: int = option(16, allowed=Range(1, integer=True),
                                  help="Calibration windows the measurement runs on.")
    damp_percent: float = option(0.01, flag="--damp", allowed=DAMP, help="Dampening as a "
                                 "fraction of the mean Hessian diagonal.")
    # 32 is fastest for the CPU sweeps
    block_size: int = option(32, allowed=Range(1, integer=True),
                             help="Columns per lazy-batch update.")


@register_method("exl2")
class EXL2(Method):
    description = ("EXL2: measured mix of 2-8 bit widths per layer for a bpw target (--bpw), "
                   "GPTQ with act-order on exllamav2's grid")
    options_cls = EXL2Options
    needs_calibration = True
    statistic = "hessian"
    default_bits = None          # type: ignore[assignment]  # --bpw excludes --bits
    default_group_size = None    # type: ignore[assignment]
    native_format = "exl2"

    @classmethod
    def make_grid(cls, bits: int | None, group_size: int | None, symmetric: bool | None,
                  options: EXL2Options) -> GridConfig:
        if symmetric is False:
            raise ConfigError("EXL2 codes are symmetric; drop --zero-point")
        if options.bpw is not None:
            if bits is not None or group_size is not None:
                raise ConfigError("--bpw lets the measurement pick bits and groups per layer; "
                                  "drop --bits/--group-size (or drop --bpw for one width)")
            return EXL2GridConfig(bpw=options.bpw)
        bits = 4 if bits is None else bits
        group_size = 128 if group_size is None else group_size
        GROUP_ROWS.check(group_size, "--group-size (rows per EXL2 group)")
        return EXL2GridConfig((bits,), (1.0,), (group_size,))

    @classmethod
    def check(cls, config: QuantizeConfig) -> None:
        o = config.options
        if not isinstance(config.grid, EXL2GridConfig):
            raise ConfigError(f"exl2 quantizes onto EXL2 mixes, not {config.grid.describe()}")
        if config.targets.embeddings or config.targets.lm_head:
            raise ConfigError("exl2 quantizes decoder-block linears only; drop "
                              "--quantize-embeddings/--quantize-lm-head")
        if o.measurement is not None and o.bpw is None:
            raise ConfigError("--measurement is for a --bpw target; add --bpw")

    def __init__(self, config: QuantizeConfig):
        super().__init__(config)
        self.params = EXL2Params(config.options.damp_percent, config.options.block_size)
        self.settings: dict[str, EXL2GridConfig] = {}
        self.measurement: Any = None
        self.report: dict[str, Any] | None = None
        self.path: Path | None = None
        self.identity: dict[str, Any] = {}
        self.targets: list[str] = []

    # -- before any work: the measurement file, the target's feasibility -----------------

    def prepare(self, model, targets: list[str]) -> None:
        """Resolve the measurement file and refuse an impossible target or a measurement
        of another model, before any work starts."""
        from quantbench.quant.exl2.measure import (Measurement, check_target, model_identity,
                                                   plan_slots)

        if not self.config.grid.is_target:
            return
        self.targets = list(targets)
        self.identity = model_identity(model, targets)
        self.path = self._measurement_path()
        if self.path.is_dir():
            raise ConfigError(f"--measurement {self.path} is a directory; name a JSON file "
                              f"in it, e.g. {self.path / 'measurement.json'}")
        if self.path.is_file():
            self.measurement = Measurement.load(self.path)
            self.measurement.check_model(self.identity, str(self.path))
            if not self.measurement.complete:
                self.measurement.check_resumable(self._calibration(), self.measurement.ladder,
                                                 str(self.path))
            log.info("EXL2: %s measurement %s", "reusing" if self.measurement.complete else
                     "resuming", self.path)
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot write the EXL2 measurement beside {self.path} "
                                  f"({exc.strerror}); pass --measurement FILE") from exc
            self.measurement = Measurement(self.identity, self._calibration())
        slots = self.measurement.slots if self.measurement.complete else \
            plan_slots(model, targets, self.measurement.ladder)
        check_target(self.config.grid.bpw, [[c.bits for c in s.candidates] for s in slots],
                     sum(s.numel for s in slots))

    def _calibration(self) -> dict[str, Any]:
        o = self.config.options
        return {"samples": o.measure_samples, "calib_samples": o.calib_samples,
                "calib_len": o.calib_len, "calib_seed": o.calib_seed,
                "calib_data": o.calib_data, "calib_chat_template": o.calib_chat_template,
                "batch_size": o.batch_size}

    def _measurement_path(self) -> Path:
        from quantbench.models.sample import cache_root

        if self.config.options.measurement:
            return Path(self.config.options.measurement).expanduser()
        key = hashlib.sha256(dumps([self.identity["digest"], self._calibration()],
                                   sort_keys=True).encode()).hexdigest()[:20]
        return cache_root() / "exl2" / f"measurement-{key}.json"

    def plan_costs(self, model, shapes: dict[str, tuple[int, int]], hidden: int, tokens: int,
                   fwd: float) -> dict[str, float]:
        """A ``bpw`` run: the measurement of the blocks its file still lacks (all without a
        file, none with a complete one)."""
        from quantbench.calibration.plan import exl2_measurement

        if not self.config.grid.is_target:
            return {}
        m = self.measurement
        todo = model.num_blocks if m is None else 0 if m.complete else \
            model.num_blocks - len({slot.block for slot in m.slots})
        return exl2_measurement(model, self.config, shapes, hidden, todo) if todo else {}

    # -- at block 0 of the pipeline: measure (or resume), then allocate -------------------

    def prepare_block(self, ctx) -> None:
        if ctx.index != 0 or not self.config.grid.is_target or self.report is not None:
            return
        from quantbench.quant.exl2.measure import measure, plan_slots

        m = self.measurement
        if not m.complete:
            log.info("EXL2: measuring into %s", self.path)
            measure(ctx.model, ctx.calibration.first(self.config.options.measure_samples), m,
                    plan_slots(ctx.model, self.targets, m.ladder),
                    self._quantize_measured, lambda mm: mm.save(self.path),
                    lambda h: prepare_hessian(h.cpu(), self.params))
        self.settings, self.report = m.allocate(self.config.grid.bpw)
        log.info("EXL2: %.4f bpw for a %.4g target, predicted error %.5g (sum of %d branches)",
                 self.report["achieved_bpw"], self.config.grid.bpw,
                 self.report["predicted_error"], len(m.slots))

    def _quantize_measured(self, weight: torch.Tensor, hessian: Any,
                           grids: list[EXL2GridConfig]) -> list[torch.Tensor]:
        """The measurement's GPTQ: every mix of one linear in one stacked sweep (CPU)."""
        results = exl2_quantize_many(weight.cpu(), hessian, grids, self.params)
        return [qt.dequantize().to(weight.device) for qt, _ in results]

    # -- the quantization pass ----------------------------------------------------------------

    def grid_for(self, name: str) -> EXL2GridConfig:
        if not self.config.grid.is_target:
            return self.config.grid
        if name not in self.settings:
            raise ConfigError(f"{name} has no EXL2 setting in this run's allocation")
        return self.settings[name]

    def quantize_weight(self, name: str, weight: torch.Tensor) -> QuantizedTensor:
        raise NotImplementedError("exl2 quantizes block linears only, from their Hessian")

    def quantize_with_stats(self, name: str, weight: torch.Tensor,
                            hessian: torch.Tensor) -> QuantizedTensor:
        qt, stats = self.grid_for(name).gptq(weight, hessian, self.params)
        if stats.damp_increased:
            log.warning("%s: Cholesky failed at %.2g%% damping; used %.3g", name,
                        100 * self.params.damp_percent, stats.damp)
        qt.meta.update({"gptq_damp": stats.damp, "gptq_proxy_error": stats.proxy_error})
        return qt

    def side_files(self, directory: Path) -> list[str]:
        """A bpw run: the measurement it used and the allocation (target, achieved bpw,
        predicted error, every tensor's mix), beside the weights."""
        from quantbench.formats.manifest import write_json_atomic

        if self.report is None:
            return []
        self.measurement.save(Path(directory) / MEASUREMENT_FILE)
        strategy = {**self.report, "measurement": str(self.path),
                    "settings": {n: g.desc for n, g in self.settings.items()}}
        # a predicted error from NaN measurements has no value: null, and the log says so
        write_json_atomic(Path(directory) / STRATEGY_FILE, with_nulls(strategy, STRATEGY_FILE))
        return [MEASUREMENT_FILE, STRATEGY_FILE]

