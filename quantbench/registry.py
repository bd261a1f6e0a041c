"""Name → class registries for quantization methods and checkpoint formats.

Leaf tables: they never import their entries. ``quantbench/builtins.py`` (imported by
``quantbench/__init__.py``) imports the built-in methods and formats, which register here."""
from __future__ import annotations

from typing import Callable, TypeVar

from quantbench.errors import ConfigError

T = TypeVar("T")

_METHODS: dict[str, type] = {}
_FORMATS: dict[str, type] = {}


def _register(table: dict[str, type], kind: str, name: str) -> Callable[[type[T]], type[T]]:
    def decorator(cls: type[T]) -> type[T]:
        if name in table and table[name] is not cls:
            raise ValueError(f"{kind} {name!r} is already registered by {table[name].__name__}")
        table[name] = cls
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return decorator


def register_method(name: str) -> Callable[[type[T]], type[T]]:
    return _register(_METHODS, "method", name)


def register_format(name: str) -> Callable[[type[T]], type[T]]:
    return _register(_FORMATS, "format", name)


def _get(table: dict[str, type], kind: str, name: str) -> type:
    if name not in table:
        import difflib

        known = ", ".join(sorted(table)) or "none"
        close = difflib.get_close_matches(str(name).lower(), list(table), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown {kind} {name!r}; {hint}choose one of: {known}")
    return table[name]


def get_method(name: str) -> type:
    return _get(_METHODS, "method", name)


def get_format(name: str) -> type:
    return _get(_FORMATS, "format", name)


def method_names() -> list[str]:
    return sorted(_METHODS)


def format_names() -> list[str]:
    return sorted(_FORMATS)
