"""Where quantbench keeps what it downloads or derives (samples, imported GGUFs, evaluation
baselines, EXL2 measurements, llama.cpp builds): ``$QUANTBENCH_CACHE``, else
``$XDG_CACHE_HOME/quantbench``, else ``~/.cache/quantbench``. A leaf every layer may import."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("QUANTBENCH_CACHE"):
        return Path(os.environ["QUANTBENCH_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "quantbench"
