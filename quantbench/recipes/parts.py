"""The parts of a recipe below its jobs: the key sets, the gate/eval/upload/targets blocks and
the typed value checks, each refusal naming where in the recipe it is (``recipes/schema.py``
builds jobs and recipes from these)."""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from quantbench.config import TargetConfig
from quantbench.errors import ConfigError
from quantbench.eval.protocol import EvalProtocol
from quantbench.ranges import Range


class RecipeError(ConfigError):
    """A recipe that cannot run: unknown key, wrong type, impossible combination."""


TOP_KEYS = ("name", "source", "output_dir", "overwrite", "verify", "report", "plot", "defaults", "eval",
            "gate", "upload", "jobs")
JOB_KEYS = ("name", "source", "method", "methods", "bits", "group_size", "symmetric", "format",
            "formats", "type", "types", "targets", "eval", "gate", "upload")
EVAL_KEYS = ("ctx", "max_tokens", "n_windows", "scoring", "data", "batch_size", "device", "cache")
GATE_KEYS = ("max_delta_ppl_pct", "max_kld", "min_top1")
UPLOAD_KEYS = ("repo", "private", "revision", "commit_message")
TARGET_KEYS = ("include", "exclude", "embeddings", "lm_head")
KINDS = {"int": "an integer", "number": "a number", "bool": "true or false",
         "str": "a non-empty string"}
NAME_FIELDS = ("name", "method", "bits", "group_size", "format", "type", "source")


# What each gate bound can be: top-1 agreement is a fraction (0.9 for 90 %)
GATE_RANGES = {"max_delta_ppl_pct": Range(0), "max_kld": Range(0), "min_top1": Range(0, 1)}


@dataclass(frozen=True)
class Gate:
    """Quality a job must reach to pass (and be uploaded); ``None`` leaves a bound out."""

    max_delta_ppl_pct: float | None = None
    max_kld: float | None = None
    min_top1: float | None = None

    def __post_init__(self) -> None:
        for key, allowed in GATE_RANGES.items():
            if getattr(self, key) is not None:
                allowed.check(getattr(self, key), key)

    def check(self, result) -> list[str]:
        """Reasons ``result`` (an ``EvalResult``) fails the gate; empty when it passes."""
        reasons = []
        if self.max_delta_ppl_pct is not None and \
                not result.delta_ppl_pct <= self.max_delta_ppl_pct:
            reasons.append(f"Δppl {result.delta_ppl_pct:+.3f} % > {self.max_delta_ppl_pct:g} %")
        if self.max_kld is not None and not result.kld_mean <= self.max_kld:
            reasons.append(f"KLD {result.kld_mean:.5g} > {self.max_kld:g}")
        if self.min_top1 is not None and not result.top1 >= self.min_top1:
            reasons.append(f"top-1 {result.top1:.4f} < {self.min_top1:g}")
        return reasons


@dataclass(frozen=True)
class Evaluation:
    """How artifacts are scored (``quantbench eval``'s options): protocol, device, cache."""

    protocol: EvalProtocol = field(default_factory=EvalProtocol)
    device: str = "auto"
    cache: bool = True


@dataclass(frozen=True)
class Upload:
    """A Hub target; ``repo`` may name the job: ``user/model-{name}`` (also ``{method}``,
    ``{bits}``, ``{group_size}``, ``{format}``, ``{type}``, ``{source}``)."""

    repo: str
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None


def _tuple(value: Any) -> tuple:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,)


def _located(where: str, fn: Callable):
    try:
        return fn()
    except ConfigError as exc:
        raise RecipeError(f"{where}: {exc}") from exc


def _mapping(data: Any, where: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: expected a mapping of {', '.join(allowed)}, "
                          f"got {type(data).__name__}")
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{where}: unknown key {key!r}{hint}; allowed: "
                              f"{', '.join(allowed)}")
    return data


def _typed(value: Any, where: str, kind: str) -> Any:
    """``value`` checked as ``kind``: int, number, bool, str; one-line error otherwise."""
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "number": isinstance(value, (int, float)) and not isinstance(value, bool),
          "bool": isinstance(value, bool),
          "str": isinstance(value, str) and value.strip() != ""}[kind]
    if not ok:
        raise RecipeError(f"{where}: expected {KINDS[kind]}, got {value!r}")
    return float(value) if kind == "number" else value


def _one_or_many(data: Mapping[str, Any], one: str, many: str, where: str, kind: str) -> tuple:
    if one != many and one in data and many in data:
        raise RecipeError(f"{where}: give '{one}' or '{many}', not both")
    key = one if one in data else many
    if key not in data:
        return (None,)
    values = _tuple(data[key])
    if not values:
        raise RecipeError(f"{where}.{key}: empty list")
    return tuple(_typed(v, f"{where}.{key}", kind) for v in values)


def _gate(data: Any, where: str, base: Gate | None = None) -> Gate:
    data = _mapping(data or {}, where, GATE_KEYS)
    values = {}
    for key, value in data.items():
        if value is not None:
            value = _typed(value, f"{where}.{key}", "number")
            if not math.isfinite(value):  # .nan/.inf in YAML: no bound a result can meet
                raise RecipeError(f"{where}.{key}: expected a finite number, got {value:g} "
                                  "(leave the key out for no bound)")
        values[key] = value
    return _located(where, lambda: dataclasses.replace(base or Gate(), **values))


def _evaluation(data: Any, where: str, base: Evaluation | None = None) -> Evaluation:
    data = _mapping(data or {}, where, EVAL_KEYS)
    base = base or Evaluation()
    fields = base.protocol.to_dict()
    for key in ("ctx", "n_windows", "batch_size"):
        if data.get(key) is not None:
            fields[key] = _typed(data[key], f"{where}.{key}", "int")
    if "max_tokens" in data:  # null or 0: the whole text
        fields["max_tokens"] = _typed(data["max_tokens"], f"{where}.max_tokens", "int") \
            if data["max_tokens"] is not None else None
        fields["max_tokens"] = fields["max_tokens"] or None
    for key in ("scoring", "data"):
        if data.get(key) is not None:
            fields[key] = _typed(data[key], f"{where}.{key}", "str")
    protocol = _located(where, lambda: EvalProtocol(**fields))
    device = _typed(data["device"], f"{where}.device", "str") if "device" in data else base.device
    cache = _typed(data["cache"], f"{where}.cache", "bool") if "cache" in data else base.cache
    return Evaluation(protocol, device, cache)


def _upload(data: Any, where: str, base: Upload | None = None) -> "Upload | bool | None":
    if data is None or isinstance(data, bool):
        return data
    data = _mapping(data, where, UPLOAD_KEYS)
    if "repo" not in data and base is None:
        raise RecipeError(f"{where}: 'repo' is required (user/name)")
    values = {k: _typed(v, f"{where}.{k}", "bool" if k == "private" else "str")
              for k, v in data.items() if v is not None}
    return dataclasses.replace(base, **values) if base else Upload(**values)


def _targets(data: Any, where: str) -> TargetConfig:
    data = _mapping(data or {}, where, TARGET_KEYS)
    for key in ("include", "exclude"):
        for value in _tuple(data.get(key, ())):
            _typed(value, f"{where}.{key}", "str")
    for key in ("embeddings", "lm_head"):
        if key in data:
            _typed(data[key], f"{where}.{key}", "bool")
    return _located(where, lambda: TargetConfig(
        tuple(_tuple(data.get("include", ()))), tuple(_tuple(data.get("exclude", ()))),
        data.get("embeddings", False), data.get("lm_head", False)))


def _option_names() -> tuple[str, ...]:
    """Every registered method's option field names (``quantbench/options.py``)."""
    from quantbench.options import option_fields
    from quantbench.registry import get_method, method_names

    return tuple(sorted({f.name for m in method_names()
                         for f in option_fields(get_method(m).options_cls)}))


_KIND_OF = {bool: "bool", int: "int", float: "number", str: "str"}


def _check_options(data: Mapping[str, Any], where: str) -> None:
    """Method option values type-checked against their fields' annotations (``None`` where
    the field is optional); values are kept as given."""
    from quantbench.options import field_type, option_fields
    from quantbench.registry import get_method, method_names

    types = {f.name: field_type(f) for m in method_names()
             for f in option_fields(get_method(m).options_cls)}
    for key, value in data.items():
        if key in types and not (value is None and types[key][1]):
            _typed(value, f"{where}.{key}", _KIND_OF[types[key][0]])


GRID_KEYS = ("bits", "group_size", "symmetric")
PAIRS = (("method", "methods"), ("format", "formats"), ("type", "types"))


def _grid_values(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """bits (one or a list), group_size and symmetric, type-checked."""
    values: dict[str, Any] = {}
    if data.get("bits") is not None:
        values["bits"] = _one_or_many(data, "bits", "bits", where, "int")
    if data.get("group_size") is not None:
        values["group_size"] = _typed(data["group_size"], f"{where}.group_size", "int")
    if data.get("symmetric") is not None:
        values["symmetric"] = _typed(data["symmetric"], f"{where}.symmetric", "bool")
    return values
