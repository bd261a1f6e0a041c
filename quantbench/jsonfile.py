"""The one JSON encoder of quantbench: every JSON text it writes (manifests, reports, caches,
configs, metadata blobs) goes through :func:`dumps`, which never emits a bare ``NaN``,
``Infinity`` or ``-Infinity`` — Python's ``json`` writes them by default, but they are not
JSON, and other tools (jq, browsers, the Hub, most parsers) refuse or misread the file.

A non-finite float reaching :func:`dumps` is a bug where the value must be finite, so it raises
:class:`NonFiniteJSON` naming where it sits. A place where a value may legitimately be missing
(a statistic a method could not measure, an unmeasured EXL2 candidate) says so explicitly with
:func:`with_nulls`, which writes ``null`` instead and logs which values it replaced.
``tests/faults/test_eval_non_finite.py`` walks the source for JSON writes that bypass this module.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Iterator

log = logging.getLogger(__name__)


class NonFiniteJSON(ValueError):
    """A non-finite float was about to be written as JSON (a bug: the value had to be finite)."""

    def __init__(self, what: str, where: str, value: float):
        self.where, self.value = where, value
        super().__init__(f"{what}: {value} at {where or 'the top level'} cannot be written as "
                         "JSON (bare NaN/Infinity is not valid JSON)")


def non_finite(payload: Any, where: str = "") -> Iterator[tuple[str, float]]:
    """``(path, value)`` of every non-finite float in ``payload`` (dicts, lists, tuples), in
    order; the path reads ``results.w4.ppl`` or ``slots[3].error``."""
    if isinstance(payload, float):
        if not math.isfinite(payload):
            yield where, payload
    elif isinstance(payload, dict):
        for key, value in payload.items():
            yield from non_finite(value, f"{where}.{key}" if where else str(key))
    elif isinstance(payload, (list, tuple)):
        for i, value in enumerate(payload):
            yield from non_finite(value, f"{where}[{i}]")


def dumps(payload: Any, *, what: str = "JSON", **kwargs: Any) -> str:
    """``json.dumps`` that refuses non-finite floats (``what`` names the file in the error)."""
    try:
        return json.dumps(payload, allow_nan=False, **kwargs)
    except ValueError:
        found = next(non_finite(payload), None)
        if found is None:  # another ValueError (a circular reference): not ours to explain
            raise
        raise NonFiniteJSON(what, *found) from None


def with_nulls(payload: Any, what: str) -> Any:
    """``payload`` with every non-finite float replaced by None (``null``), for values that may
    legitimately be missing; each replacement is logged as a warning naming it."""
    found = list(non_finite(payload))
    if not found:
        return payload
    shown = ", ".join(f"{where} ({value})" for where, value in found[:5])
    more = f" and {len(found) - 5} more" if len(found) > 5 else ""
    log.warning("%s: non-finite %s%s written as null (JSON has no NaN/Infinity)", what, shown,
                more)
    return _nulled(payload)


def _nulled(payload: Any) -> Any:
    if isinstance(payload, float):
        return payload if math.isfinite(payload) else None
    if isinstance(payload, dict):
        return {key: _nulled(value) for key, value in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [_nulled(value) for value in payload]
    return payload


def loads_strict(text: str) -> Any:
    """``json.loads`` that refuses what is not JSON but Python reads as a float: the constants
    ``NaN``/``Infinity``/``-Infinity`` and numbers too large for a double (``1e999``); the
    ``ValueError`` names the first one's place (``rope_scaling.factor``)."""
    data = json.loads(text)
    found = next(non_finite(data), None)
    if found is not None:
        where, value = found
        raise ValueError(f"{value} at {where or 'the top level'}, which is not a JSON value")
    return data
