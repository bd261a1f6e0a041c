"""A recipe's YAML mapping turned into ``Recipe`` objects, every key and type checked, with
one-line errors that name the key and what is allowed."""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Mapping

from quantbench.config import TargetConfig
from quantbench.eval.protocol import EvalProtocol
from quantbench.recipes.schema import (EVAL_KEYS, GATE_KEYS, JOB_KEYS, KINDS, TARGET_KEYS,
                                       TOP_KEYS, UPLOAD_KEYS, Evaluation, Gate, Job, Recipe,
                                       RecipeError, Upload, _located, _tuple)


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
            if value < 0:
                raise RecipeError(f"{where}.{key}: expected a number >= 0, got {value:g}")
        values[key] = value
    return dataclasses.replace(base or Gate(), **values)


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
    return TargetConfig(tuple(_tuple(data.get("include", ()))),
                        tuple(_tuple(data.get("exclude", ()))),
                        data.get("embeddings", False), data.get("lm_head", False))


def _option_names() -> tuple[str, ...]:
    from quantbench.registry import get_method, method_names

    return tuple(sorted({f.name for m in method_names()
                         for f in dataclasses.fields(get_method(m).options_cls)}))


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


def _job(data: Any, where: str, defaults: Mapping[str, Any], recipe: dict[str, Any]) -> Job:
    """One job entry; ``defaults`` fill what it leaves out (grid values and method options
    only where the method takes them)."""
    options = _option_names()
    data = _mapping(data, where, JOB_KEYS + options)
    inherited = {k: v for k, v in defaults.items() if k not in GRID_KEYS and k not in options
                 and not any(k in pair and (pair[0] in data or pair[1] in data)
                             for pair in PAIRS)}
    merged = {**inherited, **data}
    for key in ("source", "name"):
        if merged.get(key) is not None:
            _typed(merged[key], f"{where}.{key}", "str")
    own = _grid_values(data, where)
    gate = _gate(data["gate"], f"{where}.gate", recipe["gate"]) if "gate" in data else None
    evaluation = (_evaluation(data["eval"], f"{where}.eval", recipe["evaluation"])
                  if "eval" in data else None)
    upload = _upload(data["upload"], f"{where}.upload", recipe["upload"]) \
        if "upload" in data else None
    return Job(methods=_one_or_many(merged, "method", "methods", where, "str"),
               source=merged.get("source"), bits=own.get("bits", (None,)),
               group_size=own.get("group_size"), symmetric=own.get("symmetric"),
               formats=_one_or_many(merged, "format", "formats", where, "str"),
               types=_one_or_many(merged, "type", "types", where, "str"),
               options={k: v for k, v in data.items() if k in options},
               defaults={**{k: v for k, v in defaults.items() if k in options},
                         **_grid_values(defaults, where.split(":")[0] + ": defaults")},
               targets=_targets(merged.get("targets"), f"{where}.targets"),
               name=merged.get("name") if "name" in data else None,
               gate=gate, evaluation=evaluation, upload=upload)


def parse_recipe(data: Any, origin: str) -> Recipe:
    data = _mapping(data, origin, TOP_KEYS)
    if "jobs" not in data:
        raise RecipeError(f"{origin}: 'jobs' is missing; list at least one job")
    if not isinstance(data["jobs"], list):
        raise RecipeError(f"{origin}: 'jobs' must be a list of jobs, got "
                          f"{type(data['jobs']).__name__}")
    defaults = _mapping(data.get("defaults") or {}, f"{origin}: defaults",
                        tuple(k for k in JOB_KEYS + _option_names()
                              if k not in ("name", "eval", "gate", "upload")))
    recipe = {"gate": _gate(data.get("gate"), f"{origin}: gate"),
              "evaluation": _evaluation(data.get("eval"), f"{origin}: eval"),
              "upload": _upload(data.get("upload"), f"{origin}: upload")}
    if isinstance(recipe["upload"], bool):
        raise RecipeError(f"{origin}: upload: expected a mapping with 'repo', got "
                          f"{recipe['upload']!r}")
    jobs = tuple(_job(j, f"{origin}: jobs[{i}]", defaults, recipe)
                 for i, j in enumerate(data["jobs"]))
    for key in ("name", "source", "output_dir", "report"):
        if data.get(key) is not None:
            _typed(data[key], f"{origin}: {key}", "str")
    overwrite = _typed(data["overwrite"], f"{origin}: overwrite", "bool") \
        if "overwrite" in data else False
    return Recipe(jobs=jobs, output_dir=Path(data.get("output_dir") or "recipe-out"),
                  name=data.get("name") or Path(origin).stem, source=data.get("source"),
                  overwrite=overwrite, report=data.get("report"), origin=origin, **recipe)
