"""Progress where the user sees it: plain lines in a log (bounded, never cut, no ANSI codes),
counts that mean what they say, on by default in the API and silenced by ``progress=False`` or
``QUANTBENCH_PROGRESS=off``."""
from __future__ import annotations

import re

import pytest
from rich.console import Console

from quantbench.errors import ConfigError
from quantbench.progress import _BarLine, _Plain, block_progress, clock, progress_mode

LINE = re.compile(r"^(?P<desc>.+): (?P<done>\d+)/(?P<total>\d+)(?P<rest>.*)  elapsed "
                  r"\d+:\d\d(:\d\d)?(  eta \d+:\d\d(:\d\d)?)?$")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_are_rate_limited_and_say_elapsed_and_eta():
    lines: list[str] = []
    fake = FakeClock()
    plain = _Plain(100, "gptq 4-bit g128 → dense", "blocks", write=lines.append,
                   clock_fn=fake, interval=5.0)
    for _ in range(100):  # one block a second
        fake.now += 1.0
        plain.step()
    assert len(lines) == 21  # at 1 s (the first step), 6 s, 11 s, ... 96 s, and 100 s (the last)
    assert lines[0] == "gptq 4-bit g128 → dense: 1/100 blocks  elapsed 0:01  eta 1:39"
    assert lines[1] == "gptq 4-bit g128 → dense: 6/100 blocks  elapsed 0:06  eta 1:34"
    assert lines[-1] == "gptq 4-bit g128 → dense: 100/100 blocks  elapsed 1:40"  # no eta
    assert all(LINE.match(line) and "\x1b" not in line for line in lines)


def test_the_last_step_is_always_printed_and_a_step_before_the_count_is_named():
    lines: list[str] = []
    fake = FakeClock()
    plain = _Plain(3, "q", "blocks", write=lines.append, clock_fn=fake, interval=5.0)
    fake.now = 10.0
    plain.step("(embeddings, norm, head)", 0)  # before the first block: counted as none
    fake.now = 11.0
    plain.step()
    fake.now = 12.0
    plain.step()
    fake.now = 13.0
    plain.step()
    assert lines == ["q: 0/3 blocks (embeddings, norm, head)  elapsed 0:10",
                     "q: 3/3 blocks  elapsed 0:13"]
    assert plain.line("", 13.0).endswith("elapsed 0:13")
    assert clock(3723) == "1:02:03" and clock(41) == "0:41"


def test_the_bar_line_never_cuts_its_numbers():
    from rich.progress import Progress

    progress = Progress()
    task = progress.add_task("job-with-a-long-name: gptq int4 sym g128 → compressed-tensors",
                             total=30, unit="blocks", label="")
    progress.update(task, advance=12)
    for width in (200, 80, 50):
        console = Console(width=width, record=True, file=open("/dev/null", "w"))
        console.print(_BarLine(progress.tasks[0]))
        text = console.export_text()
        assert "12/30 blocks  elapsed" in text and "…" not in text, text
        assert max(len(line) for line in text.splitlines()) <= width


def test_mode_follows_the_variable_and_the_argument(monkeypatch):
    monkeypatch.delenv("QUANTBENCH_PROGRESS", raising=False)
    assert progress_mode() == "plain"  # pytest's stderr is no terminal
    assert progress_mode(False) == "off"
    for value, mode in (("0", "off"), ("off", "off"), ("plain", "plain"), ("bar", "bar"),
                        ("auto", "plain"), ("1", "plain")):
        monkeypatch.setenv("QUANTBENCH_PROGRESS", value)
        assert progress_mode() == mode, value
    monkeypatch.setenv("QUANTBENCH_PROGRESS", "off")
    assert progress_mode(True) == "plain"  # an explicit progress=True wins
    monkeypatch.setenv("QUANTBENCH_PROGRESS", "loud")
    with pytest.raises(ConfigError, match="QUANTBENCH_PROGRESS='loud' is not a progress mode"):
        progress_mode()


def test_a_failed_loop_prints_nothing_after_its_last_line(capsys, monkeypatch):
    monkeypatch.delenv("QUANTBENCH_PROGRESS", raising=False)
    with pytest.raises(RuntimeError):
        with block_progress(10, "work", unit="steps") as step:
            step()
            step()
            raise RuntimeError("boom")
    assert capsys.readouterr().err.splitlines() == ["work: 1/10 steps  elapsed 0:00  eta 0:00"]


def _progress_lines(err: str) -> list[dict]:
    return [m.groupdict() for m in map(LINE.match, err.splitlines()) if m]


def test_api_quantize_shows_blocks_by_default_and_is_silenced(tiny_llama, tmp_path, capsys,
                                                             monkeypatch):
    import quantbench as qb

    monkeypatch.delenv("QUANTBENCH_PROGRESS", raising=False)
    model = qb.load_model(str(tiny_llama))
    q = qb.quantize(model, method="zeropoint", bits=4, group_size=32)
    lines = _progress_lines(capsys.readouterr().err)
    assert [(x["done"], x["total"]) for x in lines] == [("0", "2"), ("2", "2")]
    assert lines[0]["rest"] == " blocks (embeddings, norm, head)" and lines[1]["rest"] == " blocks"
    assert model.num_blocks == 2
    qb.save(q, tmp_path / "out", format="dense")  # writing the blocks of a finished result
    assert [x["done"] for x in _progress_lines(capsys.readouterr().err)] == ["0", "2"]
    qb.quantize(model, method="zeropoint", bits=4, group_size=32, progress=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("QUANTBENCH_PROGRESS", "0")
    qb.quantize(model, method="zeropoint", bits=4, group_size=32)
    assert capsys.readouterr().err == ""


def test_api_evaluate_counts_windows(tiny_llama, tmp_path, capsys, monkeypatch):
    import quantbench as qb

    monkeypatch.delenv("QUANTBENCH_PROGRESS", raising=False)
    report = qb.evaluate(str(tiny_llama), ctx=64, max_tokens=512, use_cache=False)
    lines = _progress_lines(capsys.readouterr().err)
    assert lines and lines[-1]["desc"] == "eval baseline"
    assert lines[-1]["done"] == lines[-1]["total"] == str(report.n_windows)
    assert lines[-1]["rest"] == " windows"
