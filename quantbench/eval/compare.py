"""``compare``: every method × bits on one source, written, read back, evaluated in one pass."""
from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from quantbench import tempfiles
from quantbench.config import TargetConfig
from quantbench.eval.evaluator import EvalReport, evaluate
from quantbench.eval.protocol import EvalProtocol
from quantbench.eval.report import ReportRow
from quantbench.devices import resolve_device
from quantbench.eval.run import artifact_factory, eval_cache_dir, make_protocol, source_factory
from quantbench.formats.io import open_artifact, write_artifact
from quantbench.errors import QuantbenchError
from quantbench.formats.manifest import record_eval, verify_artifact
from quantbench.formats.outputs import check_output, model_paths
from quantbench.models.loader import Model, load_model
from quantbench.quant.methods.base import Method
from quantbench.quant.run import (fit_default_group, make_config, quantize, quantize_progress,
                                  select_targets)
from quantbench.registry import get_format, get_method

log = logging.getLogger(__name__)


@dataclass
class Job:
    method: str
    bits: int
    group_size: int
    symmetric: bool | None = None
    options: dict[str, Any] = field(default_factory=dict)
    fmt: str = ""  # chosen by run_compare

    def config(self, targets: TargetConfig):
        return make_config(self.method, self.bits, self.group_size, self.symmetric, targets,
                           **self.options)

    @property
    def name(self) -> str:
        group = {-1: "ch", 0: "t"}.get(self.group_size, str(self.group_size))
        return f"{self.method}-w{self.bits}-g{group}" + ("-dq" if self.options.get("double_quant")
                                                         else "")


@dataclass
class CompareResult:
    rows: list[ReportRow]
    report: EvalReport
    out_dir: Path | None
    artifacts: dict[str, Path] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # row → why it has no result

    def to_dict(self) -> dict[str, Any]:
        data = self.report.to_dict()
        data.pop("errors", None)  # the evaluator's, part of ours
        data["rows"] = [asdict(row) for row in self.rows]
        if self.errors:
            data["errors"] = dict(self.errors)
        return data


def plan_jobs(methods: Sequence[str], bits: Sequence[int], group_size: int,
              method_options: dict[str, Any] | None = None) -> list[Job]:
    """Every method × bits; each method gets the options it has from ``method_options``
    (calibration settings apply to the calibrated methods only). A method defined at one width
    (nf4/fp4: 4, llm_int8: 8) runs once at that width, with its own default block when the
    group size does not apply to it."""
    jobs = []
    for m in methods:
        cls, options = get_method(m), _options_for(m, method_options or {})
        if cls.fixed_bits is None:
            jobs += [Job(m, b, group_size, options=options) for b in bits]
            continue
        group = group_size if _grid_accepts(cls, group_size, options) else cls.default_group_size
        jobs.append(Job(m, cls.fixed_bits, group, options=options))
    return jobs


def _grid_accepts(cls, group_size: int, options: dict[str, Any]) -> bool:
    from quantbench.errors import ConfigError

    try:
        cls.make_grid(cls.fixed_bits, group_size, None, cls.options_cls(**options))
    except ConfigError:
        return False
    return True


def _options_for(method: str, given: dict[str, Any]) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(get_method(method).options_cls)}
    return {k: v for k, v in given.items() if k in fields}


def _format_for(job: Job, config, fmt: str, model: Model, targets: list[str]) -> str:
    """``fmt`` if it can store the job; otherwise the method's own layout (nf4/fp4/llm_int8 →
    bitsandbytes), so one compare can hold every method; else the format's refusal stands."""
    from quantbench.errors import ConfigError

    try:
        get_format(fmt)().check(config, model, targets)
        return fmt
    except ConfigError:
        native = get_method(job.method).native_format
        if native is None or native == fmt:
            raise
    get_format(native)().check(config, model, targets)
    log.info("%s: written as %s (%s cannot store it)", job.name, native, fmt)
    return native


def _write_job(model: Model, job: Job, fmt: str, out: Path, targets: TargetConfig,
               progress: bool | None) -> tuple[Path, float]:
    qmodel = quantize(model, job.config(targets))
    start = time.perf_counter()
    with quantize_progress(qmodel, f"{job.name} → {fmt}", progress) as step:
        write_artifact(qmodel, out, fmt, overwrite=True, on_step=step)
    return out, time.perf_counter() - start


def _row(job: Job, path: Path, seconds: float, report: EvalReport) -> ReportRow:
    art = open_artifact(path)
    summary = (art.manifest or {}).get("summary", {})
    res = report.results[job.name]
    return ReportRow(name=job.name, method=job.method, bits=job.bits, group_size=job.group_size,
                     bits_per_weight=summary.get("bits_per_weight_quantized"),
                     bits_per_weight_all=summary.get("bits_per_weight"),
                     size_bytes=art.size_bytes(), ppl=res.ppl,
                     delta_ppl_pct=res.delta_ppl_pct, kld_mean=res.kld_mean,
                     kld_p99=res.kld_p99, top1=res.top1, seconds=round(seconds, 2))


def _error_row(job: Job, seconds: float) -> ReportRow:
    """A row without a result (its artifact failed verification, or its results were not
    finite): its settings, and None for everything measured."""
    return ReportRow(name=job.name, method=job.method, bits=job.bits, group_size=job.group_size,
                     bits_per_weight=None, size_bytes=None, ppl=None, delta_ppl_pct=None,
                     kld_mean=None, kld_p99=None, top1=None, seconds=round(seconds, 2))


def _verified_factories(written: dict[str, tuple[Path, float]], device, verify: bool
                        ) -> tuple[dict[str, Any], dict[str, str]]:
    """A model factory per artifact whose files match its manifest (checked before it is
    read, unless ``verify`` is off), and the refusal of each that does not."""
    factories, errors = {}, {}
    for name, (path, _) in written.items():
        try:
            if verify:
                verify_artifact(path)
            factories[name] = artifact_factory(open_artifact(path), device)
        except QuantbenchError as exc:
            errors[name] = str(exc)
    return factories, errors


def _baseline_row(model: Model, report: EvalReport) -> ReportRow:
    size = sum(p.stat().st_size for p in model.weights.files())
    bits = {"float16": 16, "bfloat16": 16, "float32": 32}.get(str(model.dtype).split(".")[-1], 16)
    return ReportRow(name="baseline", method=str(model.dtype).split(".")[-1], bits=bits,
                     group_size=None, bits_per_weight=float(bits),
                     bits_per_weight_all=float(bits), size_bytes=size,
                     ppl=report.baseline.ppl, delta_ppl_pct=0.0, kld_mean=0.0, kld_p99=0.0,
                     top1=1.0, seconds=None)


def run_compare(source: "Model | str", methods: Sequence[str] = ("absmax", "zeropoint"),
                bits: Sequence[int] = (8, 4), group_size: int | None = None,
                fmt: str = "compressed-tensors", out_dir: "str | Path | None" = None,
                targets: TargetConfig | None = None, protocol: EvalProtocol | None = None,
                progress: bool | None = None, use_cache: bool = True,
                method_options: dict[str, Any] | None = None, verify: bool = True,
                stream: str = "auto", **protocol_fields: Any) -> CompareResult:
    """Quantize with each method × bits, write with ``fmt``, read back, evaluate in lock-step.

    ``source``, when it is a quantbench output, and every artifact written are checked against
    their manifests before they are read (``verify=False`` skips it). A row whose artifact
    fails the check, or whose results are NaN/Inf, gets its error in ``errors`` instead of a
    result; the other rows still run. ``progress``: None follows ``QUANTBENCH_PROGRESS``
    (shown by default), False is silent. ``stream``: as ``evaluate_one`` (auto: the models
    run block by block when the baseline and every artifact do not fit in memory together).

    Without ``group_size``: 128 where it divides every quantized row, else the largest of 64
    or 32 that does (``quant.run.fit_default_group``, announced once)."""
    if not isinstance(source, Model):
        verify_artifact(source, verify)
    model = source if isinstance(source, Model) else load_model(source)
    protocol = make_protocol(protocol, **protocol_fields)
    targets = targets or TargetConfig()
    if group_size is None:
        group_size = fit_default_group(model, select_targets(model, targets),
                                       Method.default_group_size)
    jobs = plan_jobs(methods, bits, group_size, method_options)
    keep = out_dir is not None
    for job in jobs:  # refuse impossible combinations before any work
        config = job.config(targets)
        quantize(model, config)  # checks method, targets and grid against the shapes
        job.fmt = _format_for(job, config, fmt, model, select_targets(model, targets))
        if keep:  # each artifact replaces only an earlier quantbench output
            check_output(Path(out_dir) / job.name, True, model_paths(model))
    root = Path(out_dir) if keep else _temporary_root()
    try:
        written = {job.name: _write_job(model, job, job.fmt, root / job.name, targets, progress)
                   for job in jobs}
        device = resolve_device((method_options or {}).get("device", "auto"))
        factories, failed = _verified_factories(written, device, verify)
        report = evaluate(source_factory(model, device), factories, model.tokenizer(), protocol,
                          baseline_key=model.fingerprint(),
                          cache_dir=eval_cache_dir() if use_cache else None, progress=progress,
                          baseline_name=str(model.source), stream=stream)
        failed.update(report.errors)
        errors = {job.name: failed[job.name] for job in jobs if job.name in failed}
        for why in errors.values():
            log.error("%s", why)
        rows = [_baseline_row(model, report)]
        for job in jobs:
            path, seconds = written[job.name]
            if job.name in errors:
                rows.append(_error_row(job, seconds))
                continue
            rows.append(_row(job, path, seconds, report))
            record_eval(path, {"protocol": protocol.to_dict(), "baseline_ppl": report.baseline.ppl,
                               **report.results[job.name].to_dict()})
        return CompareResult(rows, report, root if keep else None,
                             {n: p for n, (p, _) in written.items()} if keep else {}, errors)
    finally:
        if not keep:
            tempfiles.remove(root)


TEMP_PREFIX = "quantbench-compare-"


def _temporary_root() -> Path:
    """Where a compare without ``--out-dir`` writes its artifacts: a folder in the system's
    temporary directory named for this process; those of killed compares go first."""
    folder = Path(tempfile.gettempdir())
    tempfiles.sweep(folder, TEMP_PREFIX)
    return tempfiles.make_dir(folder, TEMP_PREFIX)
