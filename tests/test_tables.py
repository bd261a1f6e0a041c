"""Result tables at 80 columns: every number shown whole (never ``…``), no line wider than the
console; the whole table when the console is wide or with ``--wide``; the JSON unchanged."""
from __future__ import annotations

import json
import re

import pytest
from rich.console import Console

import quantbench as qb
from quantbench.eval.report import ReportRow, render_table
from quantbench.tables import Col, FitTable
from tests.faults.conftest import _qb

ROWS = [ReportRow("baseline", "float16", 16, None, 16.0, 269_060_000, 26.1234, 0.0, 0.0, 0.0,
                  1.0, None),
        ReportRow("gptq-w4-g64", "gptq", 4, 64, 4.5, 89_200_000, 27.5012, 5.2712, 0.04123,
                  0.5121, 0.8931, 123.44),
        ReportRow("awq-w3", "awq", 3, -1, 3.5, 72_000_000, 1234.5678, 4625.912, 1.23456,
                  12.3456, 0.4102, 1234.5)]
HEADERS = ("method", "bits", "group", "bits/w quant.", "bits/w all", "size", "ppl", "Δppl %", "KLD", "KLD p99",
           "top-1 %", "time (s)")


def render(renderable, width: int) -> str:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    console.print(renderable, crop=False)
    return console.export_text()


def shown(r: ReportRow) -> list[str]:
    """Each value of the row as the table formats it."""
    return [r.method, str(r.bits), f"{r.bits_per_weight:.3f}", f"{r.size_bytes / 1e6:.1f} MB",
            f"{r.ppl:.3f}", f"{r.delta_ppl_pct:+.2f}", f"{r.kld_mean:.4f}", f"{r.kld_p99:.3f}",
            f"{100 * r.top1:.2f}"] + ([] if r.seconds is None else [f"{r.seconds:.1f}"])


def tokens(text: str) -> set[str]:
    return set(re.findall(r"[^\s│┃]+(?: MB)?", text))


@pytest.mark.parametrize("width", [80, 60, 40])
def test_compare_table_fits_without_cutting_a_number(width):
    text = render(render_table(ROWS, "quantbench compare — sample:smollm2 (compressed-tensors)",
                               "WikiText-2 test, ctx 512, 32 windows", wide=False), width)
    assert "…" not in text
    assert max(map(len, text.splitlines())) <= width, text
    found = tokens(text)
    for r in ROWS:
        for value in shown(r):
            assert value in found, f"{value!r} not whole at {width} columns:\n{text}"
    assert "channel" in found and "--wide shows one table" in " ".join(text.split())


def test_compare_table_is_whole_when_wide_or_asked():
    table = render_table(ROWS, "t", "proto")
    for text in (render(table, 200), render(render_table(ROWS, "t", "proto", wide=True), 80)):
        header = next(line for line in text.splitlines() if "method" in line)
        assert all(h in header for h in HEADERS), header  # one table, every column
        assert "split" not in text and "…" not in text


def test_a_listing_goes_to_blocks_and_drops_only_empty_cells():
    table = FitTable([Col("tensor", "left", key=True), Col("shape", "left"), Col("grid", "left"),
                      Col("bits/weight", "left")], panels=False, hint="--wide shows one table")
    name = "model.layers.10.block_sparse_moe.experts.7.w1.weight"
    table.add_row(name, "14336×4096", "int4 asym g128", "4.25")
    table.add_row("lm_head.weight", "32000×4096", "", "16")
    text = render(table, 80)
    assert f"{name}   shape 14336×4096" in text and "bits/weight 4.25" in text
    assert "lm_head.weight   shape 32000×4096   bits/weight 16" in text  # no empty "grid"
    assert max(map(len, text.splitlines())) <= 80


@pytest.fixture
def artifact(tiny_llama, tmp_path):
    q = qb.quantize(qb.load_model(str(tiny_llama)), method="zeropoint", bits=4, group_size=32,
                    progress=False)
    return qb.save(q, tmp_path / "tiny-llama-zeropoint-w4-g32-an-artifact-with-a-long-name",
                   format="dense", progress=False)


def test_eval_at_80_columns_shows_every_number_of_its_json(artifact, tmp_path, capsys,
                                                           monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    args = ("eval", artifact, "--ctx", "64", "--max-tokens", "512", "--no-cache")
    result = _qb(capsys, *args, "--json", tmp_path / "r.json")
    assert result.code == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    r = report["results"][artifact.name]
    text = result.stdout
    assert "…" not in text and max(map(len, text.splitlines())) <= 80, text
    found = tokens(text)
    for value in (f"{report['baseline']['ppl']:.4f}", f"{r['ppl']:.4f}",
                  f"{r['delta_ppl_pct']:+.3f}", f"{r['kld_mean']:.5f}", f"{r['kld_p99']:.4f}",
                  f"{100 * r['top1']:.2f}", str(r["n_tokens"]), artifact.name):
        assert value in found, f"{value!r} not whole:\n{text}"
    wide = _qb(capsys, *args, "--wide", "--json", tmp_path / "w.json")
    assert wide.code == 0, wide.stderr
    header = next(line for line in wide.stdout.splitlines() if "model" in line)
    assert all(h in header for h in ("ppl", "Δppl %", "KLD mean", "KLD p99", "top-1 %",
                                     "tokens")), wide.stdout
    again = json.loads((tmp_path / "w.json").read_text())["results"][artifact.name]
    assert {k: v for k, v in again.items() if k != "seconds"} == \
        {k: v for k, v in r.items() if k != "seconds"}  # --wide: the same numbers


def test_inspect_tensors_at_80_columns_names_every_tensor_whole(artifact, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = _qb(capsys, "inspect", artifact, "--tensors")
    assert result.code == 0, result.stderr
    assert "…" not in result.stdout and max(map(len, result.stdout.splitlines())) <= 80
    info = qb.inspect(artifact)
    found = tokens(result.stdout)
    assert all(t["name"] in found for t in info["tensors"])


def test_recipe_table_leaves_out_columns_with_nothing_to_say():
    """No bounds and no Hub target (the demo): no gate or upload column; an errored job
    brings the verdict column back, so ERROR is never hidden."""
    from quantbench.recipes.run import JobReport, RecipeReport, render_recipe_table

    def job(name, status="passed", gate=None):
        return JobReport(name, "src", {}, status=status, ppl=30.0, kld_mean=0.1,
                         gate=gate or {"passed": True, "reasons": [], "thresholds": {}},
                         upload={"status": "skipped", "reason": "no upload target"})

    plain = render(render_recipe_table(RecipeReport("r", [job("a"), job("b")]), True), 200)
    header = next(line for line in plain.splitlines() if "job" in line)
    assert "gate" not in header and "upload" not in header and "KLD" in header
    bad = render(render_recipe_table(RecipeReport("r", [job("a"), job("b", "error")]), True),
                 200)
    assert "gate" in next(line for line in bad.splitlines() if "job" in line)
    assert "ERROR" in bad
    gated = job("c", gate={"passed": True, "reasons": [], "thresholds": {"max_kld": 0.5}})
    assert "gate" in render(render_recipe_table(RecipeReport("r", [gated]), True), 200)
