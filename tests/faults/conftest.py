"""The corruption and fault suite's shared helpers.

``qb(*args)`` runs the CLI in-process (no interpreter start per case) and returns what a user
sees: exit code, stdout, stderr. ``assert_refused(result, *needles)`` is the contract every bad
input must meet: non-zero exit, exactly one line on stderr starting ``error:``, each needle in
it, no traceback, no "internal error". ``assert_no_leftovers(folder, keep=...)`` checks that a
refused or killed run left nothing behind in a folder (no output, no hidden temporary).
``fresh_llama(tmp_path)`` writes a new tiny llama checkpoint (tokenizer copied from a cached
one, so it is cheap) for a test to damage.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import make_tiny_llama


# a plain progress line (stderr is no terminal here): ``desc: 2/2 blocks  elapsed 0:00``
PROGRESS_LINE = re.compile(r": \d+/\d+\b.*  elapsed \d+:\d\d(:\d\d)?(  eta \d+:\d\d(:\d\d)?)?$")


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        """stderr's lines, the progress lines of the work done before a refusal set aside."""
        return [line for line in self.stderr.strip().splitlines()
                if line.strip() and not PROGRESS_LINE.search(line)]

    @property
    def progress_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if PROGRESS_LINE.search(line)]


def _qb(capsys, *args) -> Result:
    from quantbench.cli import main

    capsys.readouterr()
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


@pytest.fixture
def qb(capsys, monkeypatch):
    """``qb("convert", src, "-o", out)`` → ``Result``: the CLI run in this process."""
    monkeypatch.setenv("COLUMNS", "400")  # one error line stays one line
    return lambda *args: _qb(capsys, *args)


def run_subprocess(*args, cwd=None, env=None, timeout=600) -> Result:
    """The CLI in its own interpreter (for kill -9 and import-level behaviour)."""
    full_env = {**os.environ, "COLUMNS": "400", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "quantbench.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_refused(result: Result, *needles: str) -> str:
    """The one-line-error contract; returns the line."""
    assert result.code != 0, f"accepted (exit 0):\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.lines
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error:"), line
    assert "internal error" not in line, line
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in: {line}"
    return line


def assert_no_leftovers(folder: Path, keep: tuple[str, ...] = ()) -> None:
    """Nothing in ``folder`` besides the names in ``keep`` (hidden temporaries included)."""
    folder = Path(folder)
    if not folder.exists():
        return
    extra = sorted(p.name for p in folder.iterdir() if p.name not in keep)
    assert not extra, f"left behind in {folder}: {extra}"


@pytest.fixture(scope="session")
def _pristine_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("faults") / "pristine")


@pytest.fixture
def fresh_llama(_pristine_llama, tmp_path):
    """``fresh_llama()`` → a new copy of a tiny llama checkpoint under ``tmp_path`` to damage."""
    counter = iter(range(1000))

    def make(name: str | None = None) -> Path:
        dst = tmp_path / (name or f"src{next(counter)}")
        shutil.copytree(_pristine_llama, dst)
        return dst
    return make


@pytest.fixture
def no_work(monkeypatch):
    """Loading, importing or quantizing anything fails the test: refusals come first."""
    import quantbench.models.gguf_import as gguf_import
    import quantbench.models.loader as loader
    from quantbench.quant.run import QuantizedModel

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the output was refused")

    monkeypatch.setattr(loader, "load_model", forbidden)
    monkeypatch.setattr(gguf_import, "cached_hf_checkpoint", forbidden)
    monkeypatch.setattr(QuantizedModel, "run", forbidden)
