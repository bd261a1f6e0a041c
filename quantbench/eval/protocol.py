"""How an evaluation is run: context length, how many tokens, which positions are scored."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from quantbench.errors import ConfigError
from quantbench.ranges import Range

SCORING = ("full", "half")
CTX = Range(8, integer=True)
WINDOWS = Range(1, integer=True)
BATCH_SIZE = Range(1, integer=True)


def max_tokens_range(ctx: int) -> Range:
    """``--max-tokens``: at least one window of ``ctx`` tokens, or 0 for the whole text."""
    return Range(ctx, integer=True, also=((0, "the whole text"),))


@dataclass(frozen=True)
class EvalProtocol:
    """``full`` scores every next token of a window (ctx−1 per window); ``half`` scores only
    the second half as llama.cpp's ``perplexity`` does (``ctx − ctx//2 − 1`` per window), on
    its windows (a tokenizer that adds BOS: BOS overwrites each chunk's first token)."""

    ctx: int = 512
    max_tokens: int | None = 16384
    n_windows: int | None = None
    scoring: str = "full"
    data: str | None = None
    batch_size: int = 1

    def __post_init__(self) -> None:
        CTX.check(self.ctx, "--ctx")
        if self.max_tokens is not None:
            max_tokens_range(self.ctx).check(self.max_tokens, "--max-tokens")
            if self.max_tokens == 0:  # as on the command line: the whole text
                object.__setattr__(self, "max_tokens", None)
        if self.n_windows is not None:
            WINDOWS.check(self.n_windows, "--windows")
        if self.scoring not in SCORING:
            raise ConfigError(f"scoring must be 'full' or 'half', got {self.scoring!r}")
        BATCH_SIZE.check(self.batch_size, "batch size")

    @property
    def first_scored(self) -> int:
        """Index of the first logit position that is scored in each window."""
        return self.ctx // 2 if self.scoring == "half" else 0

    def scored_per_window(self) -> int:
        return self.ctx - self.first_scored - 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvalProtocol":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def describe(self, n_windows: int | None = None, data_name: str | None = None) -> str:
        data = data_name or (self.data or "WikiText-2 test")
        windows = f"{n_windows} windows" if n_windows else (
            f"≤{self.max_tokens} tokens" if self.max_tokens else "all tokens")
        scoring = "full-window" if self.scoring == "full" else "second-half (llama.cpp)"
        return f"{data}, ctx {self.ctx}, {windows}, {scoring} scoring"
