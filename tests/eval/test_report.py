import json

from rich.console import Console

from quantbench.eval.report import ReportRow, plot_curves, plot_size_vs_quality, render_table, write_json

ROWS = [ReportRow("baseline", "float16", 16, None, 16.0, 2_000_000, 10.0, 0.0, 0.0, 0.0, 1.0, None),
        ReportRow("zp-w4", "zeropoint", 4, 64, 4.5, 600_000, 10.5, 5.0, 0.02, 0.2, 0.9, 1.5)]


def test_table_json_plot(tmp_path):
    console = Console(record=True, width=200)
    console.print(render_table(ROWS, "t", "proto"))
    text = console.export_text()
    assert "zeropoint" in text and "+5.00" in text and "90.00" in text
    write_json(tmp_path / "r.json", {"rows": [r.__dict__ for r in ROWS]})
    assert json.loads((tmp_path / "r.json").read_text())["rows"][1]["bits"] == 4
    plot_size_vs_quality(ROWS, tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_plot_skips_missing_points(tmp_path):
    series = {"EXL2": [(4.0, 0.05, "4.0"), (3.0, 0.2, "3.0"), (2.5, None, "2.5")],
              "GPTQ g64": [(4.25, 0.06, "w4")],
              "empty": [(5.0, 0.0, "zero KLD cannot sit on a log axis")]}
    assert plot_curves(series, tmp_path / "c.png", "t", "bits per weight") == 2
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves(series, tmp_path / "lin.png", "t", "bpw", log_y=False) == 3
