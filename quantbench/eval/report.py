"""Presentation apart from computation: rich tables, JSON files, the size-vs-quality plot."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from rich.markup import escape

from quantbench.formats.manifest import atomic_write, write_json_atomic
from quantbench.tables import Col, FitTable


@dataclass
class ReportRow:
    name: str
    method: str
    bits: int | None
    group_size: int | None
    bits_per_weight: float | None
    size_bytes: int | None
    ppl: float | None
    delta_ppl_pct: float | None
    kld_mean: float | None
    kld_p99: float | None
    top1: float | None
    seconds: float | None
    # over all weights; ``bits_per_weight`` is in the quantized tensors (bits_per_weight.py)
    bits_per_weight_all: float | None = None


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _group(g: int | None) -> str:
    return {None: "—", -1: "channel", 0: "tensor"}.get(g, str(g))


WIDE_HINT = "--wide shows one table"


def render_table(rows: Sequence[ReportRow], title: str, protocol_text: str,
                 errors: Mapping[str, str] | None = None, wide: bool = False) -> FitTable:
    """One row per model; a row named in ``errors`` shows ERROR where its perplexity would be.
    Laid out for the console it is printed on (:mod:`quantbench.tables`): the method, bits and
    group name each row in every panel; ``wide``: one table whatever the width."""
    from quantbench.bits_per_weight import ALL_HEADER, QUANTIZED_HEADER

    table = FitTable([Col("method", "left", key=True), Col("bits", key=True),
                      Col("group", key=True)] +
                     [Col(h) for h in (QUANTIZED_HEADER, ALL_HEADER, "size", "ppl", "Δppl %",
                                       "KLD", "KLD p99", "top-1 %", "time (s)")],
                     title=title, caption=protocol_text, wide=wide, hint=WIDE_HINT)
    for r in rows:
        table.add_row(r.method, _fmt(r.bits, "d"), _group(r.group_size),
                      _fmt(r.bits_per_weight, ".3f"), _fmt(r.bits_per_weight_all, ".3f"),
                      "—" if r.size_bytes is None else f"{r.size_bytes / 1e6:.1f} MB",
                      "[red]ERROR[/]" if r.name in (errors or {}) else _fmt(r.ppl, ".3f"),
                      _fmt(r.delta_ppl_pct, "+.2f"), _fmt(r.kld_mean, ".4f"),
                      _fmt(r.kld_p99, ".3f"),
                      "—" if r.top1 is None else f"{100 * r.top1:.2f}", _fmt(r.seconds, ".1f"))
    return table


def eval_table(report, target: str, wide: bool = False) -> FitTable:
    """``quantbench eval``'s table: the baseline, then each model evaluated against it."""
    table = FitTable([Col("model", "left", key=True)] +
                     [Col(h) for h in ("ppl", "Δppl %", "KLD mean", "KLD p99", "top-1 %",
                                       "tokens")],
                     title=escape(f"{target} — {report.describe()}"), wide=wide,
                     hint=WIDE_HINT)
    b = report.baseline
    table.add_row("baseline" + (" (cached)" if b.cached else ""), f"{b.ppl:.4f}", "", "", "",
                  "", str(b.n_tokens))
    for name, r in report.results.items():
        table.add_row(escape(name), f"{r.ppl:.4f}", f"{r.delta_ppl_pct:+.3f}",
                      f"{r.kld_mean:.5f}", f"{r.kld_p99:.4f}", f"{100 * r.top1:.2f}",
                      str(r.n_tokens))
    return table


def write_json(path: Path, payload: Any) -> None:
    write_json_atomic(Path(path), payload)


def plot_size_vs_quality(rows: Sequence[ReportRow], path: Path, title: str) -> None:
    """Scatter of file size (MB) against Δppl %, one labelled point per row; PNG, atomic."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.add_subplot()
    for r in rows:
        if r.size_bytes is None or r.delta_ppl_pct is None:
            continue
        x = r.size_bytes / 1e6
        marker = "*" if r.name == "baseline" else "o"
        ax.scatter([x], [r.delta_ppl_pct], marker=marker, s=80 if marker == "*" else 36)
        ax.annotate(r.name, (x, r.delta_ppl_pct), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("Δ perplexity vs baseline (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    with atomic_write(Path(path)) as fh:
        fig.savefig(fh, format="png", bbox_inches="tight")


Point = tuple[float, float, str]  # (x, y, label)


def plot_curves(series: dict[str, Sequence[Point]], path: Path, title: str, xlabel: str,
                ylabel: str = "mean KLD vs baseline (nats, log scale)", log_y: bool = True) -> int:
    """One line per family (points joined in x order, each labelled), e.g. bits per weight
    against KLD for EXL2 targets beside uniform GPTQ/AWQ/RTN and GGUF points; PNG, atomic.
    Points without a value (or not positive on a log axis) are left out; returns the number of
    lines drawn."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.add_subplot()
    drawn = 0
    for family, points in series.items():
        pts = sorted(p for p in points if p[0] is not None and p[1] is not None
                     and (p[1] > 0 or not log_y))
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.2, label=family)
        drawn += 1
        for x, y, label in pts:
            if label:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    with atomic_write(Path(path)) as fh:
        fig.savefig(fh, format="png", bbox_inches="tight")
    return drawn
