"""``quantbench`` command line: convert, eval, compare, inspect, list, upload, run."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from quantbench.cli_options import MethodOptionsCommand, flag_names
from quantbench.errors import QuantbenchError

out = Console()
err = Console(stderr=True)


def _csv(kind):
    def convert(ctx, param, value):
        if value is None:
            return None
        try:
            values = [kind(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError as exc:
            raise click.BadParameter(f"expected a comma-separated list ({exc})") from exc
        if not values:  # an empty list compared nothing and still exited 0
            raise click.BadParameter("expected a comma-separated list of at least one value, "
                                     f"got {value!r}")
        return values
    return convert


def _protocol_options(f):
    options = [
        click.option("--ctx", type=int, default=None, help="Context length per window (512)."),
        click.option("--max-tokens", type=int, default=None,
                     help="Cap on evaluated tokens (16384; 0 = whole text)."),
        click.option("--windows", "n_windows", type=int, default=None, help="Cap on windows."),
        click.option("--scoring", type=click.Choice(["full", "half"]), default=None,
                     help="full: every next token; half: llama.cpp's second-half scoring."),
        click.option("--data", type=str, default=None,
                     help="Eval text: .txt or .jsonl with a 'text' field (WikiText-2 test)."),
        click.option("--no-cache", is_flag=True, help="Do not read or write the baseline cache."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _stream_option(f):
    return click.option(
        "--stream", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
        help="on: run each model block by block over all windows (memory: one block and the "
             "windows' hidden states, not the model); off: whole models in float32; auto: "
             "whole when they fit the available memory (see eval --plan).")(f)


def _no_verify_option(what: str):
    return click.option("--no-verify", is_flag=True,
                        help=f"Use {what} without checking its files against the sizes and "
                             "sha256 its quantbench.json records (checked by default; a "
                             "mismatch is refused).")


_wide_option = click.option(
    "--wide", is_flag=True,
    help="Print the result table whole, however wide (default: laid out for the console's "
         "width, 80 columns when piped, split into panels when it does not fit).")


def _protocol_fields(ctx, max_tokens, n_windows, scoring, data) -> dict[str, Any]:
    fields = {"ctx": ctx, "n_windows": n_windows, "scoring": scoring, "data": data}
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens or None
    return fields


def _flag(option: str) -> str:
    return flag_names().get(option, "--" + option.replace("_", "-"))


def _method_options(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """Only the options the method has (with AWQ, those of its ``--then`` method too); naming
    one it lacks is an error, not silence."""
    from quantbench.registry import get_method

    chosen = {k: v for k, v in given.items() if v is not None}
    get_method(method).check_options(chosen, _flag)
    return chosen


def _accepts(method: str, given: dict[str, Any]) -> bool:
    from quantbench.registry import get_method

    return bool(get_method(method).option_names(given) & set(given))


def _check_files_to_write(**flags: str | None) -> None:
    """``--json``/``--plot`` that name a directory are refused before any work."""
    from quantbench.formats.manifest import check_file_target

    for flag, path in flags.items():
        if path:
            check_file_target(path, f"--{flag}")


def _write_json(path: str | None, payload: Any) -> None:
    if path:
        from quantbench.formats.manifest import write_json_atomic
        from quantbench.formats.outputs import check_report_path

        check_report_path(path, "--json")  # never a folder or a file of a model
        write_json_atomic(Path(path), payload)
        err.print(f"wrote {path}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="quantbench")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, debug: bool) -> None:
    """Quantize language models, write the formats runtimes load, and prove the quality."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False, show_time=False)])
    ctx.obj = {"debug": debug}


@cli.command(cls=MethodOptionsCommand)
@click.argument("source")
@click.option("--method", "-m", default=None,
              help="Quantizer (zeropoint; rtn with --type). See `quantbench list`.")
@click.option("--type", "-t", "gguf_type", default=None,
              help="GGUF type or llama.cpp mixture (Q4_K_M, Q5_K_M, Q8_0, Q6_K, Q3_K_M, Q2_K, "
                   "...): llama.cpp's per-tensor rules; implies --format gguf.")
@click.option("--bits", "-b", type=int, default=None,
              help="Code width (default: the method's; 4 for the integer methods).")
@click.option("--group-size", "-g", type=int, default=None,
              help="Columns per group; -1 per output channel, 0 per tensor (default 128, "
                   "or the largest of 64/32 that divides every quantized row, announced); "
                   "nf4/fp4: values per absmax block (default 64).")
@click.option("--symmetric/--zero-point", default=None,
              help="Grid kind (default: what the method implies).")
@click.option("--format", "-f", "fmt", default=None,
              help="Output layout (dense; gguf with --type; exl2 with --method exl2). See "
                   "`quantbench list`.")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path),
              help="Output directory; for a GGUF, NAME.gguf writes that file, with its "
                   "manifest beside it as NAME.gguf.quantbench.json.")
@click.option("--include", multiple=True, help="Regex of module names to quantize (repeatable).")
@click.option("--exclude", multiple=True, help="Regex of module names to keep (repeatable).")
@click.option("--quantize-embeddings", is_flag=True, help="Also quantize the token embeddings.")
@click.option("--quantize-lm-head", is_flag=True, help="Also quantize lm_head.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own Python code.")
@click.option("--allow-non-finite", is_flag=True,
              help="Accept NaN/Inf in source weights: tensors holding them are kept as they "
                   "are, not quantized (default: refused).")
@click.option("--json", "json_path", default=None, help="Write the manifest summary here.")
@click.option("--plan", is_flag=True,
              help="Only estimate time and peak memory for this run; write nothing.")
def convert(source, method, gguf_type, bits, group_size, symmetric, fmt, output, include,
            exclude, quantize_embeddings, quantize_lm_head, overwrite, trust_remote_code,
            allow_non_finite, json_path, plan, **calibration):
    """Quantize SOURCE and write it to OUTPUT in --format."""
    from quantbench.config import TargetConfig
    from quantbench.formats.file_output import check_output_format
    from quantbench.formats.io import check_output, write_artifact
    from quantbench.formats.manifest import manifest_path
    from quantbench.formats.outputs import check_output_space, check_report_path, source_paths
    from quantbench.hub.command import argv_from_context
    from quantbench.models.loader import load_model
    from quantbench.quant.run import make_config, quantize, quantize_progress
    from quantbench.registry import get_format

    if not plan:  # where it writes, checked before loading or quantizing anything
        check_output(output, overwrite, source_paths(source))
    check_report_path(json_path, "--json", [source], [] if plan else [output])
    if str(source).endswith(".gguf") and not (method or gguf_type) and fmt in (None, "dense"):
        _gguf_to_hf(Path(source), output, overwrite, allow_non_finite)
        return
    method = method or ("imatrix" if calibration.get("imatrix_file") else
                        "rtn" if gguf_type else "zeropoint")
    fmt = fmt or ("gguf" if gguf_type else "exl2" if method == "exl2" else "dense")
    targets = TargetConfig(tuple(include), tuple(exclude), quantize_embeddings, quantize_lm_head)
    config = make_config(method, bits, group_size, symmetric, targets, gguf_type=gguf_type,
                         **_method_options(method, calibration))
    writer = get_format(fmt)()
    check_output_format(output, fmt)  # -o NAME.gguf: only a GGUF is one file
    model = load_model(source, trust_remote_code=trust_remote_code,
                       allow_non_finite=allow_non_finite)
    qmodel = quantize(model, config)
    config = qmodel.config  # a default group size fitted to the model's rows
    writer.check(config, model, qmodel.targets)
    if plan:
        _print_plan(model, config, json_path, qmodel.method)
        return
    check_output_space(output, qmodel, writer)  # before the progress bar and any work
    with quantize_progress(qmodel, f"{method} {config.grid.describe()} → {fmt}") as step:
        write_artifact(qmodel, output, writer, overwrite=overwrite, on_step=step,
                       command=argv_from_context(click.get_current_context()))
    from quantbench.bits_per_weight import describe

    manifest = json.loads(manifest_path(output).read_text())
    summary = manifest["summary"]
    out.print(f"[green]wrote[/] {output}  ({fmt}, {len(qmodel.targets)} tensors quantized, "
              f"{describe(summary)}, {summary['size_bytes'] / 1e6:.1f} MB)")
    _print_outliers(manifest, config)
    _print_exl2_allocation(output)
    _write_json(json_path, manifest)


def _gguf_to_hf(source: Path, output: Path, overwrite: bool, allow_non_finite: bool) -> None:
    """``convert model.gguf --format dense`` without a method: the GGUF's weights dequantized
    into an FP16 Hugging Face checkpoint (config, safetensors, tokenizer); every tensor is
    read once first, so NaN/Inf is refused as for any source (``--allow-non-finite``)."""
    from quantbench.errors import QuantbenchError
    from quantbench.formats.file_output import check_output_format
    from quantbench.formats.io import copy_checkpoint
    from quantbench.models.gguf_import import cached_hf_checkpoint
    from quantbench.models.loader import open_model_dir

    if not source.is_file():
        raise QuantbenchError(f"{source} does not exist; pass a .gguf file")
    check_output_format(output, "dense")  # a checkpoint is a directory, not NAME.gguf
    checkpoint = cached_hf_checkpoint(source)
    weights = open_model_dir(checkpoint, str(source), allow_non_finite=allow_non_finite).weights
    for name in weights.names():
        weights.get(name)
    copy_checkpoint(checkpoint, output, str(source), overwrite)
    out.print(f"[green]wrote[/] {output}  (FP16 Hugging Face checkpoint of {source.name})")


def _print_outliers(manifest: dict[str, Any], config) -> None:
    """LLM.int8: how much of each layer's input its run-time decomposition keeps in 16-bit."""
    stats = {n: t["stats"] for n, t in manifest["tensors"].items()
             if "outlier_fraction" in t.get("stats", {})}
    if not stats:
        return
    worst = max(stats, key=lambda n: stats[n]["outlier_fraction"])
    mean = sum(s["outlier_fraction"] for s in stats.values()) / len(stats)
    out.print(f"outlier columns (calibration |x| >= {config.options.threshold:g}): "
              f"{100 * mean:.2f} % of input columns per layer on average, at most "
              f"{100 * stats[worst]['outlier_fraction']:.2f} % ({worst}); per layer in "
              "quantbench.json")


def _print_exl2_allocation(output: Path) -> None:
    """exl2 with --bpw: what the optimiser achieved and where the measurement is kept."""
    from quantbench.quant.methods.exl2 import STRATEGY_FILE

    if not (output / STRATEGY_FILE).is_file():
        return
    s = json.loads((output / STRATEGY_FILE).read_text())
    out.print(f"EXL2 allocation: {s['achieved_bpw']:.4f} bpw for a {s['target_bpw']:g} target, "
              f"predicted error {s['predicted_error']:.4g} (sum over branches); measurement "
              f"{s['measurement']} (reuse it with --measurement for other targets)",
              soft_wrap=True)


def _print_plan(model, config, json_path: str | None, method=None) -> None:
    from rich.table import Table

    from quantbench.calibration.plan import estimate

    p = estimate(model, config, method=method)
    table = Table(title=f"plan: {config.method} {config.grid.describe()} on {model.source}")
    table.add_column("quantity")
    table.add_column("estimate", justify="right")
    table.add_row("decoder blocks", str(p.blocks))
    table.add_row("calibration tokens", f"{p.tokens:,}")
    for part, gflop in p.parts.items():
        table.add_row(f"  {part}", f"{gflop:,.0f} GFLOP")
    table.add_row(f"{p.device} matmul throughput", f"{p.machine_gflops:,.0f} GFLOP/s")
    table.add_row("estimated time", f"{p.seconds / 60:.1f} min")
    table.add_row("estimated peak memory", f"{p.peak_bytes / 2**30:.2f} GiB")
    out.print(table)
    _write_json(json_path, p.to_dict())


@cli.command(name="eval")
@click.argument("target")
@click.option("--baseline", default=None, help="Baseline source (default: the artifact's source).")
@_protocol_options
@click.option("--json", "json_path", default=None, help="Write the report as JSON.")
@click.option("--device", default="auto", show_default=True,
              help="Where the models run: auto (a CUDA GPU when torch sees one), cpu, cuda:N.")
@_no_verify_option("TARGET (and a quantbench output given as --baseline)")
@_stream_option
@click.option("--plan", is_flag=True,
              help="Print the estimated peak memory of each mode (whole model, block-streamed) "
                   "and the one that would run, then exit without evaluating.")
@_wide_option
def eval_cmd(target, baseline, ctx, max_tokens, n_windows, scoring, data, no_cache, json_path,
             device, no_verify, stream, plan, wide):
    """Perplexity, KLD and top-1 of TARGET against its FP baseline (or of a source alone)."""
    from quantbench.eval.report import eval_table
    from quantbench.eval.run import evaluate_one, plan_eval

    _check_files_to_write(json=json_path)
    fields = _protocol_fields(ctx, max_tokens, n_windows, scoring, data)
    if plan:
        estimate = plan_eval(target, baseline=baseline, device=device, verify=not no_verify,
                             stream=stream, **fields)
        _print_eval_plan(estimate, str(target))
        _write_json(json_path, estimate.to_dict())
        return
    report = evaluate_one(target, baseline=baseline, progress=None, use_cache=not no_cache,
                          device=device, verify=not no_verify, stream=stream, **fields)
    out.print(eval_table(report, str(target), wide), crop=False)
    _print_bits(report.artifacts)
    _write_json(json_path, report.to_dict())


def _print_eval_plan(p, target: str) -> None:
    from rich.table import Table

    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    chosen = "whole model" if p.mode == "whole" else (
        "block-streamed, hidden states spilled to disk" if p.spill else "block-streamed")
    table = Table(title=escape(f"eval plan: {target}"))
    table.add_column("")
    table.add_column("", justify="right")
    table.add_row("models (baseline + candidates)", str(p.models))
    table.add_row("parameters per model", f"{p.parameters:,}")
    table.add_row("tokens", f"{p.tokens:,}")
    table.add_row("peak memory, whole model", gib(p.whole_bytes))
    table.add_row("peak memory, streamed", gib(p.streamed_bytes))
    table.add_row("peak memory, streamed + spilled", gib(p.spilled_bytes))
    if p.spill_file_bytes:
        table.add_row("spill file", gib(p.spill_file_bytes))
    table.add_row("memory available", gib(p.available_bytes))
    table.add_row("work", f"{p.gflop:,.0f} GFLOP")
    table.add_row("[bold]runs as[/]", f"[bold]{chosen}[/]")
    out.print(table)


def _print_bits(artifacts: dict[str, dict[str, Any]]) -> None:
    from quantbench.bits_per_weight import describe

    for name, summary in artifacts.items():
        out.print(f"{escape(name)}: {describe(summary)}")  # wrapped at the console's width


@cli.command(cls=MethodOptionsCommand)
@click.argument("source")
@click.option("--method", "-m", "methods", default="absmax,zeropoint", show_default=True,
              callback=_csv(str))
@click.option("--bits", "-b", default="8,4", show_default=True, callback=_csv(int))
@click.option("--group-size", "-g", type=int, default=None,
              help="Columns per group (default: 128, or the largest of 64/32 that divides "
                   "every quantized row, announced).")
@click.option("--format", "-f", "fmt", default="compressed-tensors", show_default=True)
@click.option("--out-dir", type=click.Path(path_type=Path), default=None,
              help="Keep the artifacts here (default: a temporary directory).")
@_protocol_options
@click.option("--json", "json_path", default="compare.json", show_default=True)
@click.option("--plot", "plot_path", default="compare.png", show_default=True)
@_no_verify_option("SOURCE (when it is a quantbench output) and the artifacts written")
@_stream_option
@_wide_option
def compare(source, methods, bits, group_size, fmt, out_dir, ctx, max_tokens, n_windows,
            scoring, data, no_cache, json_path, plot_path, no_verify, stream, wide,
            **calibration):
    """Quantize SOURCE with each method × bits, evaluate all, print a table, save JSON + plot.

    Exits 1 when a row has no result (its artifact failed verification, or its results were
    NaN/Inf); the other rows are still evaluated, tabulated and saved."""
    from quantbench.eval.compare import run_compare
    from quantbench.eval.report import plot_size_vs_quality, render_table
    from quantbench.formats.outputs import check_report_path

    check_report_path(json_path, "--json", [source])
    check_report_path(plot_path, "--plot", [source])
    given = {k: v for k, v in calibration.items() if v is not None}
    if given and not any(_accepts(m, given) for m in methods):
        _method_options(methods[0], given)  # names the option no method takes
    result = run_compare(source, methods=methods, bits=bits, group_size=group_size, fmt=fmt,
                         out_dir=out_dir, progress=None, use_cache=not no_cache,
                         method_options=given, verify=not no_verify, stream=stream,
                         **_protocol_fields(ctx, max_tokens, n_windows, scoring, data))
    title = f"quantbench compare — {source} ({fmt})"
    out.print(render_table(result.rows, title, result.report.describe(), result.errors, wide),
              crop=False)
    _write_json(json_path, {"source": source, "format": fmt, **result.to_dict()})
    if plot_path:
        plot_size_vs_quality(result.rows, Path(plot_path), title)
        err.print(f"wrote {plot_path}")
    if result.errors:
        why = next(iter(result.errors.values()))
        more = f" (and {len(result.errors) - 1} more rows)" if len(result.errors) > 1 else ""
        err.print(f"error: {len(result.errors)} of {len(result.rows) - 1} rows have no result"
                  f"{more}: {why}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--tensors/--no-tensors", default=False, help="List every tensor.")
@click.option("--json", "json_path", default=None)
@_no_verify_option("ARTIFACT")
@click.option("--wide", is_flag=True,
              help="With --tensors: one row per tensor however wide (default: laid out for "
                   "the console's width, a block per tensor when the table does not fit).")
def inspect(artifact, tensors, json_path, no_verify, wide):
    """Format, config, tensors, size and bits per weight of ARTIFACT, and whether its files
    match its quantbench.json (exits 2 naming the files that do not, after the table)."""
    from quantbench.formats.inspect import failed_files, inspect_artifact
    from quantbench.formats.manifest import manifest_path, mismatch_message

    info = inspect_artifact(artifact, verify=not no_verify)
    _print_inspect(artifact, info, failed_files(info), tensors, wide)
    if json_path:  # what another tool wrote (config.json, a manifest not checked) may hold
        from quantbench.jsonfile import with_nulls  # a bare NaN: null in valid JSON

        _write_json(json_path, with_nulls(info, f"inspect {artifact}"))
    if failed_files(info):
        raise QuantbenchError(mismatch_message(manifest_path(artifact), failed_files(info)))


def _print_inspect(artifact: Path, info: dict[str, Any], failed: list, tensors: bool,
                   wide: bool) -> None:
    """The summary (values fold, never cut), then with ``tensors`` the tensor table, fitted
    to the console (:mod:`quantbench.tables`)."""
    from quantbench.bits_per_weight import ALL_KEY, ALL_LABEL, QUANTIZED_KEY, QUANTIZED_LABEL
    from quantbench.tables import Col, FitTable

    head = Table(title=escape(str(artifact)), show_header=False)
    head.add_column()
    head.add_column(overflow="fold")
    labels = {QUANTIZED_KEY: QUANTIZED_LABEL, ALL_KEY: ALL_LABEL}
    for key in ("format", "architecture", "size_bytes", "weights", "quantized_weights",
                QUANTIZED_KEY, ALL_KEY, "files_ok"):
        head.add_row(labels.get(key, key), str(info[key]))
    for problem in failed:
        head.add_row("file differs", escape(str(problem)))
    if info.get("unreadable"):
        head.add_row("unreadable", escape(info["unreadable"]))
    if info.get("quantize"):
        q = info["quantize"]
        from quantbench.config import grid_from_dict

        head.add_row("method", f"{q['method']} {grid_from_dict(q['grid']).describe()}")
    if info.get("experts"):
        from quantbench.quant.run import describe_coverage

        head.add_row("experts", escape(describe_coverage(info["experts"])))
    if info.get("eval"):
        e = info["eval"]
        head.add_row("eval", f"ppl {_num(e.get('ppl'), '.4f')}  "
                     f"Δppl {_num(e.get('delta_ppl_pct'), '+.3f')}%  "
                     f"KLD {_num(e.get('kld_mean'), '.5f')}")
    out.print(head)
    if tensors:
        table = FitTable([Col("tensor", "left", key=True)] +
                         [Col(h, "left") for h in ("shape", "dtype", "grid", "bits/weight")],
                         wide=wide, panels=False, hint="--wide shows one table")
        for t in info["tensors"]:
            table.add_row(escape(t["name"]), "×".join(map(str, t["shape"])), t["dtype"],
                          escape(t["grid"] or ""), str(t["bits_per_weight"]))
        out.print(table, crop=False)


def _num(value: Any, spec: str) -> str:
    """A number of the manifest as the tables show it (the JSON keeps every digit)."""
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


@cli.command(name="list")
def list_cmd():
    """Registered methods and formats."""
    from quantbench.registry import FORMATS, METHODS  # names and descriptions, none imported

    for title, registered in (("methods", METHODS), ("formats", FORMATS)):
        table = Table(title=title)
        table.add_column("name")
        table.add_column("what")
        for name, description in registered.descriptions().items():
            table.add_row(name, escape(description))
        out.print(table)


@click.command(name="upload")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--repo", "repo_id", required=True,
              help="Hub model repository NAMESPACE/NAME (created if missing).")
@click.option("--private", is_flag=True,
              help="Create the repository private (an existing one keeps its visibility).")
@click.option("--revision", default=None, help="Branch to commit to (created if missing).")
@click.option("--message", "-m", "message", default=None,
              help="Commit message (default: method, format and source).")
@click.option("--dry-run", is_flag=True,
              help="Check the artifact, list the files and print the model card; send nothing.")
@click.option("--no-card", is_flag=True, help="Do not generate README.md (the model card).")
@_no_verify_option("ARTIFACT")
def upload_cmd(artifact, repo_id, private, revision, message, dry_run, no_card, no_verify):
    """Upload ARTIFACT (a quantbench output: a directory, or NAME.gguf with its manifest) to the
    Hugging Face Hub, with a model card written from its manifest. The token comes from
    HF_TOKEN or `hf auth login`."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    from quantbench.hub.upload import plan_upload, push, quiet_hub_progress, resolve_token

    plan = plan_upload(artifact, repo_id, private=private, revision=revision, card=not no_card,
                       verify=not no_verify)
    token = None if dry_run else resolve_token()  # no token: one line, before any output
    table = Table(title=escape(f"{artifact} → {repo_id}" + (f" ({plan.revision})"
                                                              if plan.revision else "")))
    table.add_column("file in repository")
    table.add_column("bytes", justify="right")
    for name, size in plan.files:
        table.add_row(escape(name), f"{size:,}")
    table.add_row("[bold]total[/]", f"[bold]{plan.total_bytes:,}[/]")
    out.print(table)
    if plan.skipped:
        err.print("not in the manifest, not uploaded: " + ", ".join(plan.skipped),
                  markup=False, highlight=False)
    if dry_run:
        if plan.card is not None:
            click.echo(plan.card, nl=False)  # the exact text, no console markup
        err.print("dry run: nothing was sent to the Hub")
        return
    progress = Progress(TextColumn("[bold]uploading"), BarColumn(), DownloadColumn(),
                        TextColumn("{task.fields[file]}"), TimeElapsedColumn(), console=err,
                        transient=True)
    with quiet_hub_progress(), progress:
        task = progress.add_task("upload", total=plan.total_bytes, file="")
        done = push(plan, commit_message=message, token=token,
                    on_file=lambda name, size: progress.update(task, advance=size, file=name))
    out.print(f"[green]uploaded[/] {len(done.files)} files ({done.total_bytes / 1e6:,.1f} MB) "
              f"to {repo_id}: {done.commit_url}", soft_wrap=True)


cli.add_command(upload_cmd)


@cli.command(name="run")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--json", "json_path", default=None,
              help="Write the report here (default: the recipe's report, else "
                   "OUTPUT_DIR/recipe-report.json).")
@click.option("--dry-run-upload", is_flag=True,
              help="Go through the upload step without sending anything to the Hub.")
@click.option("--plot", "plot_path", default=None,
              help="Also draw file size against Δppl, one point per job, as this PNG "
                   "(default: the recipe's plot, else none).")
@_wide_option
def run_cmd(recipe, json_path, dry_run_upload, plot_path, wide):
    """Run a RECIPE (YAML): quantize, evaluate against one shared baseline, gate, upload.

    Exits 1 when a job failed its quality gate or errored (the others still run)."""
    from quantbench.recipes import Recipe, render_recipe_table, run_recipe

    report = run_recipe(Recipe.load(recipe), progress=None, dry_run_upload=dry_run_upload,
                        report_path=json_path, plot_path=plot_path)
    out.print(render_recipe_table(report, wide), crop=False)
    err.print(f"wrote {report.path}" + (f" and {report.plot}" if report.plot else ""))
    if not report.ok:
        names = ", ".join(f"{j.name} ({'gate' if j.status == 'failed' else 'error'})"
                          for j in report.failed)
        err.print(f"error: {len(report.failed)} of {len(report.jobs)} jobs failed: {names}",
                  markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and a non-zero exit."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        err.print(f"error: {exc.format_message()}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except QuantbenchError as exc:
        if debug:
            raise
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # last resort: one line, traceback only with --debug
        if debug:
            raise
        user = _user_os_error(exc)
        if user is not None:  # a path the user can fix, met where no reader expected it
            err.print(f"error: {user}", markup=False, highlight=False, soft_wrap=True)
            sys.exit(2)
        err.print(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the "
                  "traceback and report it)", markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)


def _user_os_error(exc: Exception) -> str | None:
    """A file-system refusal the user can fix (a path unreadable, missing or a directory),
    as one line naming the path; None for anything else (a full disk says its own)."""
    import errno

    from quantbench.inputs import os_error_message

    user = (errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENOENT)
    if not isinstance(exc, OSError) or exc.errno not in user or not exc.filename:
        return None
    return os_error_message(exc.filename, exc, "use")


if __name__ == "__main__":
    main()
