"""Name → class registries for quantization methods and checkpoint formats.

Leaf tables: they never import their entries. ``quantbench/builtins.py`` (imported by
``quantbench/__init__.py``) imports the built-in methods and formats, which register here."""
from __future__ import annotations

from typing import Callable, Iterable, TypeVar

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


def did_you_mean(name: object, choices: Iterable[str], show: Callable[[str], str] = repr
                 ) -> str:
    """``"did you mean 'gptq'? "`` for the choice nearest ``name`` (case, ``-`` and ``_``
    ignored, then difflib's closeness), or ``""`` when none is near: the one wording of
    every unknown-name refusal (methods, formats, GGUF types, method options)."""
    import difflib

    def plain(text: str) -> str:
        return text.lower().replace("_", "").replace("-", "")

    choices = list(choices)
    by_plain = {plain(c): c for c in choices}
    close = [by_plain[plain(str(name))]] if plain(str(name)) in by_plain else \
        difflib.get_close_matches(str(name).lower(), [c.lower() for c in choices], n=1,
                                  cutoff=0.6)
    if not close:
        return ""
    chosen = next(c for c in choices if c.lower() == close[0].lower())
    return f"did you mean {show(chosen)}? "


def _get(table: dict[str, type], kind: str, name: str) -> type:
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        hint = did_you_mean(name, table)
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
