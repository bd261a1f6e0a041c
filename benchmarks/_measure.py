"""Run one benchmark step in a child process and measure it (shared by the benchmark scripts)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# Linux keeps a process's peak RSS across execve: a child forked (or vforked) from this
# process starts out with OUR peak as its own, so wait4 would report max(ours, the child's).
# The command is therefore started by a small launcher process (python -S, ~10 MB), which
# forks it, waits for it and writes its rusage peak to a file.
_LAUNCHER = """
import os, sys
out, cmd = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(out, "w") as fh:
    fh.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def spawn_measured(cmd: list[str], stdout, stderr, env: dict | None = None
                   ) -> tuple[int, float, float]:
    """Run ``cmd`` to completion; ``(exit code, wall seconds, its own peak RSS in MB)``."""
    with tempfile.NamedTemporaryFile("r", suffix=".maxrss") as peak:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, peak.name, *cmd],
                                stdout=stdout, stderr=stderr, env={**os.environ, **(env or {})})
        code = proc.wait()
        seconds = time.perf_counter() - start
        text = Path(peak.name).read_text().strip()
    return code, seconds, int(text) / 1024 if text else float("nan")


def run_measured(cmd: list[str], env: dict | None = None, digits: int = 1) -> dict:
    """Run ``cmd`` alone; return its wall seconds and its own peak RSS (``wait4``, taken by a
    small launcher process so that this one's peak is not counted: see ``_LAUNCHER``).

    The child's stderr goes to a temporary file rather than a pipe, so a chatty child (progress
    bars, warnings) can never fill a pipe buffer and block while we wait; its tail is shown if the
    child fails.
    """
    with tempfile.TemporaryFile() as err:
        code, seconds, peak = spawn_measured(cmd, subprocess.DEVNULL, err, env)
        if code != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-3000:]
            raise SystemExit(f"failed ({code}): {' '.join(cmd)}\n{tail}")
    return {"seconds": round(seconds, digits), "peak_rss_mb": round(peak, 1)}
