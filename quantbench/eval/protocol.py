"""How an evaluation is run: context length, how many tokens, which positions are scored."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from quantbench.errors import ConfigError

SCORING = ("full", "half")


@dataclass(frozen=True)
class EvalProtocol:
    """``full`` scores every next token of a window (ctx−1 per window); ``half`` scores only
    the second half as llama.cpp's ``perplexity`` does (``ctx − ctx//2 − 1`` per window)."""

    ctx: int = 512
    max_tokens: int | None = 16384
    n_windows: int | None = None
    scoring: str = "full"
    data: str | None = None
    batch_size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.ctx, int) or self.ctx < 8:
            raise ConfigError(f"--ctx must be an integer >= 8, got {self.ctx!r}")
        if self.max_tokens is not None and self.max_tokens < self.ctx:
            raise ConfigError(
                f"--max-tokens {self.max_tokens} is less than one window of --ctx {self.ctx}")
        if self.n_windows is not None and self.n_windows < 1:
            raise ConfigError(f"--windows must be >= 1, got {self.n_windows}")
        if self.scoring not in SCORING:
            raise ConfigError(f"scoring must be 'full' or 'half', got {self.scoring!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")

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
