"""Name → class registries for quantization methods and checkpoint formats.

Leaf tables: they never import their entries. A class registers itself when its module is
imported (``register_method`` / ``register_format``); the built-ins are also *declared* by name
and description (``quantbench/builtins.py``, imported by ``quantbench/__init__.py``) with a
loader that imports their modules, which a table runs the first time a lookup needs a class
it does not hold yet. So naming and describing the built-ins (``quantbench list``) imports
none of them, and anything that needs a class gets every built-in of its kind."""
from __future__ import annotations

from typing import Callable, Iterable, TypeVar

from quantbench.errors import ConfigError

T = TypeVar("T")


class Table:
    """The registered classes of one kind, and the declared built-ins not imported yet."""

    def __init__(self, kind: str):
        self.kind = kind
        self.classes: dict[str, type] = {}
        self.declared: dict[str, str] = {}  # name → description, known before any import
        self._load: Callable[[], None] | None = None

    def declare(self, descriptions: dict[str, str], load: Callable[[], None]) -> None:
        """Built-ins known by name and description; ``load`` imports (registers) them."""
        self.declared.update(descriptions)
        self._load = load

    def fill(self) -> None:
        """Import the declared built-ins, once (each registers itself); a module that fails
        to import fails every lookup that needs it, saying why, not just this one."""
        load, self._load = self._load, None
        if load is None:
            return
        try:
            load()
        except BaseException:
            self._load = load
            raise

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorator(cls: type[T]) -> type[T]:
            if name in self.classes and self.classes[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered by "
                                 f"{self.classes[name].__name__}")
            self.classes[name] = cls
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return decorator

    def get(self, name: str) -> type:
        if name not in self.classes:
            self.fill()
        if name not in self.classes:
            known = ", ".join(sorted(self.classes)) or "none"
            hint = did_you_mean(name, self.classes)
            raise ConfigError(f"unknown {self.kind} {name!r}; {hint}choose one of: {known}")
        return self.classes[name]

    def names(self) -> list[str]:
        self.fill()
        return sorted(self.classes)

    def descriptions(self) -> dict[str, str]:
        """Name → one-line description of every entry, without importing a built-in."""
        found = dict(self.declared)
        found.update({name: cls.description for name, cls in self.classes.items()})
        return dict(sorted(found.items()))


METHODS = Table("method")
FORMATS = Table("format")
_METHODS = METHODS.classes
_FORMATS = FORMATS.classes


def register_method(name: str) -> Callable[[type[T]], type[T]]:
    return METHODS.register(name)


def register_format(name: str) -> Callable[[type[T]], type[T]]:
    return FORMATS.register(name)


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


def get_method(name: str) -> type:
    return METHODS.get(name)


def get_format(name: str) -> type:
    return FORMATS.get(name)


def method_names() -> list[str]:
    return METHODS.names()


def format_names() -> list[str]:
    return FORMATS.names()
