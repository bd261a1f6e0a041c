"""Shared set-up for the format tests: quantize the tiny model, write it, open it back."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from quantbench.api import quantize, save
from quantbench.formats.io import open_artifact
from quantbench.models.loader import load_model
from quantbench.quant.methods.rtn import rtn_quantize


def _nothing_written(out: Path) -> None:
    assert not out.exists(), out
    left = list(out.parent.iterdir())
    assert not left, left


@pytest.fixture
def assert_nothing_written() -> Callable[[Path], None]:
    """``assert_nothing_written(out)``: a refused conversion left neither the output nor a
    temporary sibling behind (``out``'s folder is empty)."""
    return _nothing_written


@dataclass
class Written:
    model: Any        # the source Model
    q: Any            # the in-memory quantized result
    out: Path         # the written artifact directory
    art: Any          # the artifact opened back by our reader

    def rtn_reference(self, name: str):
        """What round-to-nearest on the source weight gives (the bit-exact expectation)."""
        return rtn_quantize(self.model.weights.get(name), self.q.config.grid, torch.float16)

    def assert_quantized_like_rtn(self) -> None:
        assert sorted(self.art.quantized_names) == sorted(self.q.targets)
        for name in self.q.targets:
            assert self.art.quantized(name).equal(self.rtn_reference(name)), name


@pytest.fixture
def write_tiny(tiny_llama, tmp_path) -> Callable[..., Written]:
    """``write_tiny(format, method=..., bits=..., group_size=...)`` → ``Written``."""
    def run(fmt: str, source: Path | None = None, **quantize_kwargs) -> Written:
        model = load_model(source or tiny_llama)
        q = quantize(model, **quantize_kwargs)
        out = save(q, tmp_path / fmt, format=fmt)
        art = open_artifact(out)
        assert art.format == fmt
        return Written(model, q, out, art)
    return run
