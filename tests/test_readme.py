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


def test_cli_examples_run_in_order(tmp_path):
    env = {**os.environ, "COLUMNS": "160"}
    shutil.copytree(README.parent / "examples", tmp_path / "examples")  # files examples name
    for command in cli_commands():
        argv = shlex.split(command.split("#")[0])
        proc = subprocess.run([sys.executable, "-m", "quantbench.cli", *argv[1:]], cwd=tmp_path,
                              capture_output=True, text=True, env=env, timeout=1200)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-2000:]}"
    assert (tmp_path / "out" / "compare.png").stat().st_size > 0


def test_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for code in blocks("python"):
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "out" / "py-w4g64" / "quantbench.json").is_file()
