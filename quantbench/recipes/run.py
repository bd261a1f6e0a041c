"""Running a recipe: every job quantized and written, evaluated against one shared baseline per
(source, protocol), gated, uploaded when it passes; one JSON report and a summary table."""
from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.text import Text

from quantbench.errors import EvalError, QuantbenchError
from quantbench.eval.data import load_eval_text
from quantbench.eval.evaluator import EvalReport, evaluate
from quantbench.eval.run import artifact_factory, eval_cache_dir, source_factory
from quantbench.formats.io import check_output, open_artifact, write_artifact
from quantbench.formats.manifest import record_eval, verify_artifact, write_json_atomic
from quantbench.formats.outputs import check_report_path, model_paths
from quantbench.models.loader import Model, load_model
from quantbench.quant.run import quantize, quantize_progress
from quantbench.recipes.schema import PlannedJob, Recipe, RecipeError
from quantbench.registry import get_format

log = logging.getLogger(__name__)

REPORT_NAME = "recipe-report.json"


@dataclass
class JobReport:
    """What became of one job: settings, artifact, quality, gate verdict, upload, timings."""

    name: str
    source: str
    settings: dict[str, Any]
    status: str = "pending"  # passed | failed (gate) | error
    artifact: str | None = None
    size_bytes: int | None = None
    bits_per_weight: float | None = None
    bits_per_weight_all: float | None = None
    ppl: float | None = None
    delta_ppl_pct: float | None = None
    kld_mean: float | None = None
    kld_p99: float | None = None
    top1: float | None = None
    n_tokens: int | None = None
    gate: dict[str, Any] = field(default_factory=dict)
    upload: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "passed"

    def fail(self, stage: str, exc: BaseException) -> None:
        self.status = "error"
        self.error = f"{stage}: {type(exc).__name__}: {exc}" if not isinstance(
            exc, QuantbenchError) else f"{stage}: {exc}"
        log.error("%s: %s", self.name, self.error)


@dataclass
class BaselineReport:
    """The FP baseline of one (source, protocol) group, evaluated once for all its jobs."""

    source: str
    protocol: dict[str, Any]
    protocol_text: str
    ppl: float
    n_tokens: int
    cached: bool
    seconds: float
    jobs: list[str]


@dataclass
class RecipeReport:
    name: str
    jobs: list[JobReport]
    baselines: list[BaselineReport] = field(default_factory=list)
    path: Path | None = None
    plot: Path | None = None
    seconds: float = 0.0
    dry_run_upload: bool = False
    origin: str = ""
    started: str = ""

    @property
    def ok(self) -> bool:
        return all(job.ok for job in self.jobs)

    @property
    def failed(self) -> list[JobReport]:
        return [job for job in self.jobs if not job.ok]

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.name, "origin": self.origin, "started": self.started,
                "ok": self.ok,
                "passed": sum(j.ok for j in self.jobs), "failed": len(self.failed),
                "seconds": round(self.seconds, 2), "dry_run_upload": self.dry_run_upload,
                "plot": None if self.plot is None else str(self.plot),
                "baselines": [asdict(b) for b in self.baselines],
                "jobs": [asdict(j) for j in self.jobs]}


def run_recipe(recipe: "Recipe | str | Path", *, progress: bool | None = None,
               dry_run_upload: bool = False, report_path: "str | Path | None" = None,
               plot_path: "str | Path | None" = None) -> RecipeReport:
    """Run every job of ``recipe`` in order; a job's error or failed gate is recorded and the
    run goes on. The report is written (atomically) to ``report_path``, the recipe's ``report``
    or ``OUTPUT_DIR/recipe-report.json``; with ``plot_path`` (or the recipe's ``plot``) a PNG of
    file size against Δppl, one point per evaluated job. ``progress``: None follows
    ``QUANTBENCH_PROGRESS`` (shown by default), False is silent (:mod:`quantbench.progress`)."""
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    start = time.perf_counter()
    planned = recipe.plan()
    path = Path(report_path or recipe.report or recipe.output_dir / REPORT_NAME)
    check_report_path(path, "report", [p.source for p in planned])
    plot = plot_path or recipe.plot
    check_report_path(plot, "plot", [p.source for p in planned])
    models = _load_sources(recipe, planned)
    planned = recipe.plan(_group_fitter(models))  # default group sizes fitted, names to match
    _check(recipe, planned, models)  # impossible combinations refused before any work
    report = RecipeReport(recipe.name, [JobReport(p.name, p.source, p.settings())
                                        for p in planned], path=path,
                          dry_run_upload=dry_run_upload, origin=recipe.origin,
                          started=datetime.datetime.now(datetime.timezone.utc).isoformat(
                              timespec="seconds"))
    by_name = {j.name: j for j in report.jobs}
    if not recipe.verify:
        log.warning("%s: verify: false — artifacts are evaluated and uploaded without checking "
                    "their files against their manifests", recipe.origin)
    for jobs in _groups(planned).values():
        model = models[jobs[0].source]
        written = [job for job in jobs
                   if _write(job, model, recipe, by_name[job.name], progress)]
        verified = [job for job in written
                    if not recipe.verify or _verified(by_name[job.name])]
        _evaluate_group(model, verified, by_name, report, progress)
        for job in jobs:
            _gate_and_upload(job, by_name[job.name], dry_run_upload, recipe.verify)
        _save(report, start)
    if plot:
        _plot(report, Path(plot))
    _save(report, start)
    return report


def _plot(report: RecipeReport, path: Path) -> None:
    from quantbench.eval.report import ReportRow, plot_size_vs_quality

    rows = [ReportRow(j.name, j.settings.get("method") or "", j.settings.get("bits"),
                      j.settings.get("group_size"), j.bits_per_weight, j.size_bytes, j.ppl,
                      j.delta_ppl_pct, j.kld_mean, j.kld_p99, j.top1, None)
            for j in report.jobs]
    plot_size_vs_quality(rows, path, f"quantbench run — {report.name}")
    report.plot = path
    log.info("wrote %s", path)


def _load_sources(recipe: Recipe, planned: list[PlannedJob]) -> dict[str, Model]:
    """Load each source once (a quantbench output checked against its manifest first, unless
    ``verify: false``)."""
    models: dict[str, Model] = {}
    for job in planned:
        if job.source in models:
            continue
        try:
            if recipe.verify:
                verify_artifact(job.source)
            models[job.source] = load_model(job.source)
        except QuantbenchError as exc:
            raise RecipeError(f"{recipe.origin}: job {job.name}: {exc}") from exc
    return models


def _group_fitter(models: dict[str, Model]):
    """``Recipe.plan``'s ``fit``: a job's default group size lowered to one that divides its
    source's rows (``quant.run.fit_group_size``); a selection that matches nothing is left for
    ``_check`` to refuse with the job's name."""
    from quantbench.errors import ConfigError
    from quantbench.quant.run import fit_group_size, select_targets

    def fit(source: str, config):
        model = models[source]
        try:
            return fit_group_size(model, select_targets(model, config.targets), config)
        except ConfigError:
            return config
    return fit


def _check(recipe: Recipe, planned: list[PlannedJob], models: dict[str, Model]) -> None:
    """Check every job's method, grid, targets, format and output."""
    for job in planned:
        where = f"{recipe.origin}: job {job.name}"
        try:
            qmodel = quantize(models[job.source], job.config)
            get_format(job.format)().check(job.config, models[job.source], qmodel.targets)
            check_output(recipe.output_dir / job.name, recipe.overwrite,
                         model_paths(models[job.source]))
            if job.evaluation.protocol.data is not None:  # the eval text, before any work
                load_eval_text(job.evaluation.protocol.data)
        except QuantbenchError as exc:
            raise RecipeError(f"{where}: {exc}") from exc


def _groups(planned: list[PlannedJob]) -> dict[tuple, list[PlannedJob]]:
    """Jobs sharing a source and an evaluation share one baseline pass."""
    groups: dict[tuple, list[PlannedJob]] = {}
    for job in planned:
        ev = job.evaluation
        groups.setdefault((job.source, ev.protocol, ev.device, ev.cache), []).append(job)
    return groups


def _write(job: PlannedJob, model: Model, recipe: Recipe, rep: JobReport,
           progress: bool | None) -> bool:
    out = recipe.output_dir / job.name
    start = time.perf_counter()
    try:
        qmodel = quantize(model, job.config)
        label = f"{job.name}: {job.config.method} {job.config.grid.describe()} → {job.format}"
        with quantize_progress(qmodel, label, progress) as step:
            write_artifact(qmodel, out, job.format, overwrite=recipe.overwrite, on_step=step)
        art = open_artifact(out)
        summary = (art.manifest or {}).get("summary", {})
        rep.artifact, rep.size_bytes = str(out), art.size_bytes()
        rep.bits_per_weight = summary.get("bits_per_weight_quantized")
        rep.bits_per_weight_all = summary.get("bits_per_weight")
    except Exception as exc:  # one job's failure is reported; the recipe goes on
        rep.fail("quantize/write", exc)
        return False
    finally:
        rep.timings["quantize_write_s"] = round(time.perf_counter() - start, 3)
    return True


def _verified(rep: JobReport) -> bool:
    """The job's artifact checked against its manifest before it is evaluated; a mismatch is
    the job's error (the others go on)."""
    try:
        verify_artifact(rep.artifact)
    except QuantbenchError as exc:
        rep.fail("verify", exc)
        return False
    return True


def _evaluate_group(model: Model, jobs: list[PlannedJob], reports: dict[str, JobReport],
                    report: RecipeReport, progress: bool | None) -> None:
    """One lock-step pass: the baseline runs once and every artifact is scored on its tokens
    (the baseline's perplexity comes from the evaluator's cache when it holds it). If the joint
    pass fails, each job is evaluated alone so the error lands on the job that caused it."""
    if not jobs:
        return
    try:
        _score(model, jobs, reports, report, progress)
    except EvalError as exc:  # the shared baseline is not finite: no job can be scored
        for job in jobs:
            reports[job.name].fail("evaluate", exc)
    except Exception as exc:  # find the culprit
        if len(jobs) == 1:
            reports[jobs[0].name].fail("evaluate", exc)
            return
        log.warning("joint evaluation failed (%s); evaluating each job alone", exc)
        for job in jobs:
            try:
                _score(model, [job], reports, report, progress)
            except Exception as exc1:
                reports[job.name].fail("evaluate", exc1)


def _score(model: Model, jobs: list[PlannedJob], reports: dict[str, JobReport],
           report: RecipeReport, progress: bool | None) -> None:
    from quantbench.devices import resolve_device

    ev = jobs[0].evaluation
    device = resolve_device(ev.device)
    start = time.perf_counter()
    factories = {job.name: artifact_factory(open_artifact(reports[job.name].artifact), device)
                 for job in jobs}
    result = evaluate(source_factory(model, device), factories, model.tokenizer(), ev.protocol,
                      baseline_key=model.fingerprint(),
                      cache_dir=eval_cache_dir() if ev.cache else None, progress=progress,
                      baseline_name=jobs[0].source)
    seconds = time.perf_counter() - start
    report.baselines.append(BaselineReport(
        jobs[0].source, ev.protocol.to_dict(), result.describe(), result.baseline.ppl,
        result.baseline.n_tokens, result.baseline.cached, round(seconds, 3),
        [job.name for job in jobs]))
    for job in jobs:
        if job.name in result.errors:  # NaN/Inf results: this job's error, not a number
            reports[job.name].fail("evaluate", EvalError(result.errors[job.name]))
            continue
        _record(job, reports[job.name], result, seconds)


def _record(job: PlannedJob, rep: JobReport, result: EvalReport, seconds: float) -> None:
    r = result.results[job.name]
    rep.ppl, rep.delta_ppl_pct, rep.kld_mean = r.ppl, r.delta_ppl_pct, r.kld_mean
    rep.kld_p99, rep.top1, rep.n_tokens = r.kld_p99, r.top1, r.n_tokens
    rep.timings["eval_s"] = r.seconds
    rep.timings["eval_pass_s"] = round(seconds, 3)
    record_eval(Path(rep.artifact), {"protocol": result.protocol.to_dict(),
                                     "baseline_ppl": result.baseline.ppl, **r.to_dict()})
    reasons = job.gate.check(r)
    rep.gate = {"passed": not reasons, "reasons": reasons,
                "thresholds": {k: v for k, v in asdict(job.gate).items() if v is not None}}
    rep.status = "failed" if reasons else "passed"


def _gate_and_upload(job: PlannedJob, rep: JobReport, dry_run: bool, verify: bool) -> None:
    if rep.status == "pending":  # written but never scored (should not happen)
        rep.status, rep.error = "error", "not evaluated"
    if job.upload is None:
        rep.upload = {"status": "skipped", "reason": "no upload target"}
        return
    if rep.status != "passed":
        why = "failed the gate" if rep.status == "failed" else "errored"
        rep.upload = {"status": "skipped", "repo": job.upload.repo, "reason": f"job {why}"}
        return
    start = time.perf_counter()
    try:
        from quantbench.hub.upload import upload_artifact

        result = upload_artifact(Path(rep.artifact), job.upload.repo,
                                 private=job.upload.private, revision=job.upload.revision,
                                 commit_message=job.upload.commit_message, dry_run=dry_run,
                                 verify=verify)
        rep.upload = {"status": "dry-run" if dry_run else "uploaded", "repo": job.upload.repo,
                      "revision": job.upload.revision, "result": _jsonable(result)}
    except Exception as exc:
        rep.fail("upload", exc)
        rep.upload = {"status": "error", "repo": job.upload.repo, "reason": rep.error}
    finally:
        rep.timings["upload_s"] = round(time.perf_counter() - start, 3)


def _jsonable(value: Any) -> Any:
    """The upload helper's result as report data: where it went, not the bytes it sent."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        keep = ("repo_id", "revision", "commit_url", "private", "dry_run", "skipped")
        summary = {k: getattr(value, k) for k in keep if hasattr(value, k)}
        if isinstance(getattr(value, "files", None), list):
            summary["files"] = len(value.files)
        if hasattr(value, "total_bytes"):
            summary["total_bytes"] = value.total_bytes
        return summary
    if value is None or isinstance(value, (str, int, float, bool, list, dict)):
        return value
    return str(value)


def _save(report: RecipeReport, start: float) -> None:
    report.seconds = time.perf_counter() - start
    report.path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report.path, report.to_dict())


def _num(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def render_recipe_table(report: RecipeReport, wide: bool = False) -> Group:
    """The summary: one row per job (quality, gate verdict, upload), then one line per job
    that failed, per upload, and per baseline. The table fits the console it is printed on
    (:mod:`quantbench.tables`; ``wide``: one table whatever the width)."""
    from rich.markup import escape

    from quantbench.bits_per_weight import ALL_HEADER, QUANTIZED_HEADER
    from quantbench.tables import Col, FitTable

    # a recipe without bounds or a Hub target (the demo) has nothing to say in those columns;
    # a job that errored or failed always shows its verdict
    gated = not report.ok or any(j.gate.get("thresholds") for j in report.jobs)
    uploads = any(j.upload.get("reason") != "no upload target" for j in report.jobs)
    heads = [QUANTIZED_HEADER, ALL_HEADER, "size", "ppl", "Δppl %", "KLD", "top-1 %",
             *(["gate"] if gated else []), *(["upload"] if uploads else []), "time (s)"]
    table = FitTable([Col("job", "left", key=True)] +
                     [Col(h, "left" if h in ("gate", "upload") else "right") for h in heads],
                     title=escape(f"quantbench run — {report.name}"), wide=wide,
                     hint="--wide shows one table")
    notes = []
    for j in report.jobs:
        verdict = {"passed": "[green]pass[/]", "failed": "[red]FAIL[/]"}.get(j.status,
                                                                            "[red]ERROR[/]")
        size = "—" if j.size_bytes is None else f"{j.size_bytes / 1e6:.1f} MB"
        table.add_row(escape(j.name), _num(j.bits_per_weight, ".3f"),
                      _num(j.bits_per_weight_all, ".3f"), size, _num(j.ppl, ".3f"),
                      _num(j.delta_ppl_pct, "+.2f"), _num(j.kld_mean, ".4f"),
                      _num(None if j.top1 is None else 100 * j.top1, ".2f"),
                      *([verdict] if gated else []),
                      *([j.upload.get("status", "—")] if uploads else []),
                      _num(_seconds(j), ".1f"))
        if j.status == "failed":
            notes.append(f"{j.name}: gate failed: {'; '.join(j.gate['reasons'])}")
        elif j.status == "error":
            notes.append(f"{j.name}: {j.error}")
        if j.upload.get("status") in ("uploaded", "dry-run"):
            result = j.upload.get("result") or {}
            where = result.get("commit_url") if isinstance(result, dict) else None
            notes.append(f"{j.name}: {j.upload['status']} → {where or j.upload['repo']}")
    for b in report.baselines:
        notes.append(f"baseline {b.source}: ppl {b.ppl:.3f} ({'cached; ' if b.cached else ''}"
                     f"{b.protocol_text}) for {len(b.jobs)} job(s)")
    return Group(table, *(Text(n, overflow="fold") for n in notes))


def _seconds(job: JobReport) -> float | None:
    parts = [job.timings.get(k) for k in ("quantize_write_s", "eval_s", "upload_s")]
    return sum(p for p in parts if p is not None) if any(p is not None for p in parts) else None
