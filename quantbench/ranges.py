"""Numeric ranges declared once: the check and the text of its refusal come from one object, so
a message can never state another range than the one enforced.

A :class:`Range` is declared where a value is really limited (an option field, a grid, the
evaluation protocol) and used both to check and to say what is allowed::

    CTX = Range(8, integer=True)
    CTX.check(value, "--ctx")   # ConfigError: --ctx must be an integer >= 8, got 4
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from quantbench.errors import ConfigError

__all__ = ["Range"]


@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric setting.

    ``low``/``high`` bound it (``None``: unbounded; ``low_open``/``high_open`` exclude the bound
    itself), or ``values`` lists every allowed value; ``also`` adds special values outside the
    bounds with what they mean (``((-1, "per output channel"), (0, "per tensor"))``).
    ``integer`` refuses non-integers, ``multiple_of`` integers that are not multiples of it;
    floats must be finite.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    values: tuple[float, ...] = ()
    also: tuple[tuple[float, str], ...] = ()
    multiple_of: int | None = None

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is allowed (its type included)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if any(value == special for special, _ in self.also):
            return True
        if self.values:
            return value in self.values
        if self.multiple_of and value % self.multiple_of:
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def text(self) -> str:
        """What is allowed, as a message says it: ``an integer >= 1``, ``a number > 0 and
        < 1``, ``one of 32, 64, 128``, ``an integer from 2 to 8``."""
        kind = "an integer" if self.integer else "a number"
        if self.values:
            main = "one of " + ", ".join(_num(v) for v in self.values)
        elif self.low is not None and self.high is not None:
            if self.integer and not self.low_open and not self.high_open:
                main = f"{kind} from {_num(self.low)} to {_num(self.high)}"
            else:
                main = (f"{kind} {'>' if self.low_open else '>='} {_num(self.low)} and "
                        f"{'<' if self.high_open else '<='} {_num(self.high)}")
        elif self.low is not None:
            main = f"{kind} {'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            main = f"{kind} {'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            main = kind
        if self.multiple_of:
            main += f" and a multiple of {self.multiple_of}"
        specials = [f"{_num(v)} ({meaning})" for v, meaning in self.also]
        return ", ".join([main, *specials[:-1]]) + (f" or {specials[-1]}" if specials else "")

    def check(self, value: Any, name: str, hint: str = "") -> Any:
        """``value`` if allowed, else a ConfigError ``{name} must be {text}, got {value}``
        (``hint`` appended after a semicolon)."""
        if not self.contains(value):
            raise ConfigError(f"{name} must be {self.text()}, got {value!r}"
                              + (f"; {hint}" if hint else ""))
        return value


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
