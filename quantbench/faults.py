"""Failpoints: named moments a crash test can stop a run at, to ``kill -9`` it right there.

``failpoint("write-shard")`` does nothing unless the environment variable
``QUANTBENCH_FAILPOINT`` named that point when quantbench was imported; then it prints
``quantbench-failpoint NAME`` on stderr and sleeps, so the test that started the process sees
the marker and kills it at that moment. Read once at import: a run without the variable pays
one comparison per call.
"""
from __future__ import annotations

import os
import sys
import time

ENV = "QUANTBENCH_FAILPOINT"
MARKER = "quantbench-failpoint"
_ARMED = os.environ.get(ENV) or None


def failpoint(name: str) -> None:
    """Stop here (print the marker, sleep for good) when ``QUANTBENCH_FAILPOINT=name``."""
    if _ARMED is None or _ARMED != name:
        return
    print(f"{MARKER} {name}", file=sys.stderr, flush=True)
    while True:  # the test kills the process; nothing after this point runs
        time.sleep(60)
