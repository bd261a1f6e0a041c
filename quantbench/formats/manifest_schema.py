"""The shape of ``quantbench.json``: which key holds which type, checked when a manifest is
read (``formats/base.py`` ``read_manifest``), so a damaged or hand-edited manifest is one line
naming the key, never an AttributeError deep in ``inspect``, ``eval`` or ``upload``.

Keys a manifest may lack stay optional (older manifests lack ``command``); keys this version does
not know are left alone. Every value that is present must have its declared type, and every
file the manifest lists must be a plain name inside the artifact (``upload`` sends what it
lists).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from quantbench.errors import ConfigError, FormatError
from quantbench.inputs import json_kind

__all__ = ["check_manifest"]


@dataclass(frozen=True)
class Obj:
    """A JSON object with these known keys (others allowed); ``required`` must be present."""

    keys: dict[str, Any] = field(default_factory=dict)
    required: tuple[str, ...] = ()


@dataclass(frozen=True)
class MapOf:
    """A JSON object of arbitrary keys, each value of ``value``; ``names`` checks the keys."""

    value: Any
    names: Any = None


@dataclass(frozen=True)
class ListOf:
    item: Any


@dataclass(frozen=True)
class Maybe:
    """``inner`` or null."""

    inner: Any


# leaf types, as messages name them
STR, INT, NUM, BOOL, ANY = "a string", "an integer", "a number", "true or false", "anything"
SCALAR = "a string, number, boolean or null"
SHA256 = "a sha256 hex digest"
FILE_NAME = re.compile(r"^(?!\.\.?$)[^/\\\x00]+$")  # a plain name: no folder, not . or ..

_TENSOR = Obj({"shape": ListOf(INT), "quantized": BOOL, "bits": NUM, "grid": STR,
               "dtype": STR, "bits_per_weight": NUM, "stats": MapOf(Maybe(NUM))})
_EVAL = Obj({"protocol": Obj(), "baseline_ppl": Maybe(NUM), "ppl": Maybe(NUM),
             "delta_ppl_pct": Maybe(NUM), "kld_mean": Maybe(NUM), "kld_p99": Maybe(NUM),
             "top1": Maybe(NUM), "n_tokens": Maybe(INT)})
MANIFEST_SCHEMA = Obj({
    "manifest_version": INT,
    "tool": Obj({"name": STR, "version": STR}),
    "created": STR,
    "format": STR,
    "source": Obj({"id": STR, "path": Maybe(STR), "architecture": Maybe(STR),
                   "dtype": Maybe(STR)}),
    "quantize": Obj({"version": INT, "method": STR, "grid": Obj({"kind": STR}),
                     "targets": Obj({"include": ListOf(STR), "exclude": ListOf(STR),
                                     "embeddings": BOOL, "lm_head": BOOL}),
                     "options": MapOf(SCALAR)}),
    "summary": MapOf(SCALAR),
    "tensors": MapOf(_TENSOR),
    "files": MapOf(Obj({"bytes": INT, "sha256": SHA256}, required=("bytes", "sha256")),
                   names=FILE_NAME),
    "eval": Maybe(_EVAL),
    "command": Maybe(ListOf(STR)),  # null (or absent): not written by the CLI
    # parts of a multimodal model copied through unquantized (absent: none)
    "passthrough": MapOf(Obj({"tensors": INT, "dtype": STR})),
    "left_out": MapOf(Obj({"tensors": INT, "dtype": STR})),  # ... not in the file (GGUF)
    # a mixture-of-experts model's calibration coverage (absent: dense, or not calibrated)
    "experts": Obj({"experts": INT, "min_tokens_threshold": INT, "fallback": STR,
                    "router_weighted": BOOL, "router": STR,
                    "layers": ListOf(Obj({"layer": INT, "min_tokens": INT,
                                          "median_tokens": INT, "max_tokens": INT,
                                          "below_threshold": ListOf(INT),
                                          "force_routed": ListOf(INT)}))}),
}, required=("manifest_version", "format"))


def check_manifest(data: Any, where: str, newest_version: int) -> dict[str, Any]:
    """``data`` if it has the manifest's shape, else a FormatError naming the first key that
    does not; a manifest of a later version than ``newest_version`` is refused as such. The
    format and the grid are checked by what reads them (the registry, ``grid_from_dict``)."""
    from quantbench.quant.grids import grid_from_dict
    from quantbench.registry import format_names

    _check(data, MANIFEST_SCHEMA, "", where)
    if data["manifest_version"] > newest_version:
        raise FormatError(f"{where} is manifest version {data['manifest_version']}, newer than "
                          f"this quantbench reads ({newest_version}); upgrade quantbench")
    if data["format"] not in format_names():
        raise FormatError(f"{where}: 'format' is {data['format']!r}, which this quantbench does "
                          f"not know ({', '.join(format_names())}); {_RESTORE}")
    grid = data.get("quantize", {}).get("grid")
    try:
        if grid is not None:
            grid_from_dict(grid)
    except ConfigError as exc:
        raise FormatError(f"{where}: 'quantize.grid' is not a grid this quantbench reads "
                          f"({exc}); {_RESTORE}") from exc
    return data


_RESTORE = "the manifest is damaged: restore it or re-run quantbench convert"


def _damaged(where: str, key: str, expected: str, value: Any) -> FormatError:
    shown = f"{json_kind(value)} {value!r}" if isinstance(value, (str, int, float)) \
        and not isinstance(value, bool) else json_kind(value)
    return FormatError(f"{where}: '{key or '(top level)'}' must be {expected}, not {shown}; "
                       f"{_RESTORE}")


def _check(value: Any, spec: Any, key: str, where: str) -> None:
    if isinstance(spec, Maybe):
        if value is not None:
            _check(value, spec.inner, key, where)
    elif isinstance(spec, Obj):
        _object(value, key, where)
        for name in spec.required:
            if name not in value:
                raise FormatError(f"{where} has no '{_join(key, name)}'; {_RESTORE}")
        for name, inner in spec.keys.items():
            if name in value:
                _check(value[name], inner, _join(key, name), where)
    elif isinstance(spec, MapOf):
        _object(value, key, where)
        for name, inner in value.items():
            if spec.names is not None and not spec.names.match(name):
                raise FormatError(f"{where}: '{key}' lists {name!r}, which is not a plain file "
                                  f"name inside the artifact; {_RESTORE}")
            _check(inner, spec.value, _join(key, name), where)
    elif isinstance(spec, ListOf):
        if not isinstance(value, list):
            raise _damaged(where, key, "a list", value)
        for i, item in enumerate(value):
            _check(item, spec.item, f"{key}[{i}]", where)
    elif not _leaf_ok(value, spec):
        raise _damaged(where, key, spec, value)


def _object(value: Any, key: str, where: str) -> None:
    if not isinstance(value, dict):
        raise _damaged(where, key, "an object", value)


def _leaf_ok(value: Any, spec: str) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {STR: isinstance(value, str), INT: isinstance(value, int) and not isinstance(
        value, bool), NUM: number, BOOL: isinstance(value, bool), ANY: True,
            SCALAR: value is None or isinstance(value, (str, bool)) or number,
            SHA256: isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None
            }[spec]


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name
