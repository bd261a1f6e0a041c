"""README examples are executed as written (on the real sample model, so marked slow)."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.slow


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def cli_commands() -> list[str]:
    commands = []
    for block in blocks("bash"):
        text = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in text.splitlines()
                     if line.strip().startswith("quantbench ")]
    return commands


def test_readme_has_examples():
    assert len(cli_commands()) >= 4 and blocks("python")
    assert "make demo" in README.read_text() and "make test" in README.read_text()


def chains(commands: list[str]) -> list[list[str]]:
    """The commands in groups that touch the same ``out/NAME`` paths (one command's output
    is another's input), each group in README order: groups are independent of each other
    and run as separate tests (in parallel under ``make test``)."""
    parent = list(range(len(commands)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, command in enumerate(commands):
        for path in set(re.findall(r"\bout/[^/\s]+", command.split("#")[0])):
            if path in owner:
                parent[root(i)] = root(owner[path])
            else:
                owner[path] = i
    groups: dict[int, list[str]] = {}
    for i, command in enumerate(commands):
        groups.setdefault(root(i), []).append(command)
    return list(groups.values())


def test_chains_keep_dependent_commands_together():
    got = chains(["quantbench convert a -o out/x", "quantbench eval out/y",
                  "quantbench inspect out/x/model.gguf", "quantbench convert b --m out/m.json -o out/z",
                  "quantbench convert c --m out/m.json -o out/w", "quantbench eval out/w"])
    assert got == [["quantbench convert a -o out/x", "quantbench inspect out/x/model.gguf"],
                   ["quantbench eval out/y"],
                   ["quantbench convert b --m out/m.json -o out/z",
                    "quantbench convert c --m out/m.json -o out/w", "quantbench eval out/w"]]
    assert sum(map(len, chains(cli_commands()))) == len(cli_commands())


@pytest.mark.parametrize("chain", chains(cli_commands()),
                         ids=lambda chain: shlex.split(chain[0])[1] + ":" +
                         (re.findall(r"\bout/([^/\s]+)", chain[0]) or ["-"])[-1])
def test_cli_examples_run_in_order(chain, tmp_path):
    env = {**os.environ, "COLUMNS": "160"}
    shutil.copytree(README.parent / "examples", tmp_path / "examples")  # files examples name
    for command in chain:
        argv = shlex.split(command.split("#")[0])
        proc = subprocess.run([sys.executable, "-m", "quantbench.cli", *argv[1:]], cwd=tmp_path,
                              capture_output=True, text=True, env=env, timeout=1200)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-2000:]}"
    if any(" --plot out/compare.png" in c for c in chain):
        assert (tmp_path / "out" / "compare.png").stat().st_size > 0


def test_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for code in blocks("python"):
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "out" / "py-w4g64" / "quantbench.json").is_file()


def test_make_demo_is_the_tour_it_describes(tmp_path):
    """`make demo` as written in the Makefile (its `quantbench run` line), from a fresh folder:
    six artifacts, every one evaluated, the plot drawn, and GPTQ below round-to-nearest's KLD
    at both widths (what the tour is meant to show)."""
    import json

    makefile = (README.parent / "Makefile").read_text()
    line = re.search(r"^demo:.*\n\t\$\(BIN\)/(quantbench run .*)$", makefile, flags=re.M)
    assert line, "the demo target runs quantbench run"
    shutil.copytree(README.parent / "examples", tmp_path / "examples")
    argv = shlex.split(line.group(1))
    proc = subprocess.run([sys.executable, "-m", "quantbench.cli", *argv[1:]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "demo-results" / "recipe-report.json").read_text())
    jobs = {j["name"]: j for j in report["jobs"]}
    assert len(jobs) == 6 and all(j["status"] == "passed" and j["kld_mean"] for j in jobs.values())
    for bits in (4, 3):
        assert jobs[f"gptq-w{bits}-g64-compressed-tensors"]["kld_mean"] < \
            jobs[f"zeropoint-w{bits}-g64-compressed-tensors"]["kld_mean"]
    assert (tmp_path / "demo-results" / "demo.png").read_bytes().startswith(b"\x89PNG")
    assert max(map(len, proc.stdout.splitlines())) <= 80  # the table fits the terminal
