"""Run one benchmark step in a child process and measure it (shared by the benchmark scripts)."""
from __future__ import annotations

import os
import subprocess
import tempfile
import time


def run_measured(cmd: list[str], env: dict | None = None, digits: int = 1) -> dict:
    """Run ``cmd`` alone; return its wall seconds and its own peak RSS (``wait4``).

    The child's stderr goes to a temporary file rather than a pipe, so a chatty child (progress
    bars, warnings) can never fill a pipe buffer and block while we wait; its tail is shown if the
    child fails.
    """
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        if status != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-3000:]
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return {"seconds": round(seconds, digits), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}
