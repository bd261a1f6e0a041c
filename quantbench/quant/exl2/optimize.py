"""Bit allocation: one candidate per slot, least total error within a bit budget.

A multiple-choice knapsack. :func:`solve` is a dynamic programme over the budget in units of
``u`` bits, each candidate's cost rounded *up* to whole units, so every answer fits the true
budget. With ``u = 1`` (budgets up to ``cells`` bits) it is exactly optimal; otherwise it is
optimal for the rounded costs, so its error is at most that of the best exact solution for the
budget less ``slots·u`` bits (``Allocation.slack_bits``: ``slots/cells`` of the budget, under
0.001 bpw for SmolLM2's 60 branches at the default resolution). exllamav2 anneals instead
(FORMATS.md §4.6); this bound is what a DP buys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from quantbench.errors import ConfigError
from quantbench.lazy import torch

DEFAULT_CELLS = 1 << 18


@dataclass(frozen=True)
class Allocation:
    choice: tuple[int, ...]   # candidate index per slot
    bits: int                 # exact total bits of the choice
    error: float              # total error of the choice
    budget: int               # the budget it had to fit
    slack_bits: int           # optimal among choices that fit budget − slack_bits (0: exact)


def bounds(costs: list[list[int]]) -> tuple[int, int]:
    """Total bits of the cheapest and of the dearest choice."""
    return sum(min(c) for c in costs), sum(max(c) for c in costs)


def solve(costs: list[list[int]], errors: list[list[float]], budget: int,
          cells: int = DEFAULT_CELLS) -> Allocation:
    """Least ``Σ errors[s][k]`` over choices ``k`` per slot ``s`` with ``Σ costs[s][k] ≤
    budget``. Raises ConfigError when even the cheapest choice does not fit."""
    if len(costs) != len(errors) or any(len(c) != len(e) or not c
                                        for c, e in zip(costs, errors)):
        raise ValueError("every slot needs one error per candidate cost, and a candidate")
    cheapest, _ = bounds(costs)
    if cheapest > budget:
        raise ConfigError(f"the cheapest choice needs {cheapest} bits, over the budget {budget}")
    unit = max(1, math.ceil(budget / cells))
    while True:
        choice = _dp(costs, errors, budget // unit, unit)
        if choice is not None or unit == 1:
            break
        unit = max(1, unit // 4)   # the rounding ate the little room there is: refine
    if choice is None:  # unreachable: with unit 1 the cheapest choice always fits
        raise ConfigError("no choice fits the budget")
    bits = sum(costs[s][k] for s, k in enumerate(choice))
    error = sum(errors[s][k] for s, k in enumerate(choice))
    slack = 0 if unit == 1 else len(costs) * unit
    return Allocation(tuple(choice), bits, error, budget, slack)


def _dp(costs: list[list[int]], errors: list[list[float]], units: int, unit: int
        ) -> list[int] | None:
    """``best[b]``: least error of the slots so far within ``b`` units; argmins kept per slot
    for the walk back. None when nothing fits."""
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    best = torch.zeros(units + 1, dtype=torch.float64)
    picks = []
    for cost, err in zip(costs, errors):
        steps = [math.ceil(c / unit) for c in cost]
        options = torch.full((len(cost), units + 1), float("inf"), dtype=torch.float64)
        for k, (step, e) in enumerate(zip(steps, err)):
            if step <= units:
                options[k, step:] = best[:units + 1 - step] + float(e)
        best, pick = options.min(dim=0)
        picks.append((pick.to(torch.int16), steps))
    if not torch.isfinite(best[units]) or best[units] == inf:
        return None
    choice, b = [], units
    for pick, steps in reversed(picks):
        k = int(pick[b])
        choice.append(k)
        b -= steps[k]
    return choice[::-1]
