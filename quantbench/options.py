"""Method options declared once: each field of a method's options dataclass says, beside its
default, its help and how the command line spells it.

The field name is the recipe key and the Python keyword (``qb.quantize(model, damp_percent=...)``);
``cli_options.py`` generates ``quantbench convert``'s flags from these declarations, and
``recipes/schema.py`` its option keys, so a new option is one field::

    damp_percent: float = option(0.01, flag="--damp",
                                 help="Dampening as a fraction of the mean Hessian diagonal.")

The flag's type comes from the annotation: ``int``, ``float``, ``str`` (``choices`` for a fixed
set), each optionally ``| None``; a number declares the values it takes as a ``Range``
(``allowed=Range(0, 1, low_open=True, high_open=True)``), which :func:`check_values` enforces
whenever the options are built (CLI, recipes, the API, a manifest) and states when it refuses;
a ``bool`` is a ``--x/--no-x`` pair (``off_flag`` names another off spelling), or with
``switch=True`` a plain flag that only turns it on. ``cli=False`` keeps an option to the Python
API and recipes; ``internal`` marks a field that is no option at all (a transform's built inner
options).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from quantbench.errors import ConfigError
from quantbench.ranges import Range

__all__ = ["OptionSpec", "check_values", "cli_flag", "declaring_classes", "field_type",
           "internal", "off_flag", "option", "option_fields", "option_label", "option_spec"]

_KEY = "quantbench.option"
_NO_FIELD = dataclasses.field()
_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


@dataclass(frozen=True)
class OptionSpec:
    """What a field declares beyond its default (read with :func:`option_spec`)."""

    help: str
    flag: str | None = None        # the long flag; None: ``--`` + the name with dashes
    off_flag: str | None = None    # a bool pair's off spelling; None: ``--no-`` + the flag
    switch: bool = False           # a bool only ever switched on: a plain flag
    choices: tuple[str, ...] | str | None = None  # the values, or a class attribute naming them
    cli: bool = True               # False: Python API and recipes only
    internal: bool = False         # not a user option (recipes and the CLI never see it)
    allowed: Range | None = None   # a number's allowed values (None: any of its type)


def option(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None,
           off_flag: str | None = None, switch: bool = False,
           choices: tuple[str, ...] | str | None = None, cli: bool = True,
           allowed: Range | None = None) -> Any:
    """A method option field: ``default``, one line of ``help`` (without the default: the CLI
    adds it), its command-line spelling and, for a number, the values it takes."""
    spec = OptionSpec(" ".join(help.split()), flag, off_flag, switch, choices, cli,
                      allowed=allowed)
    return dataclasses.field(default=default, metadata={_KEY: spec})


def internal(default: Any = None) -> Any:
    """A field of an options dataclass that is no user option."""
    return dataclasses.field(default=default, metadata={_KEY: OptionSpec("", cli=False,
                                                                         internal=True)})


def option_spec(cls: type, f: dataclasses.Field) -> OptionSpec:
    """The declaration of field ``f`` of options class ``cls``: its own, or, where a subclass
    redeclares a field only for its default (``calib_samples: int = 32``), the nearest base
    class's. A field declared nowhere with :func:`option` is a programming error."""
    for klass in cls.__mro__:
        declared = getattr(klass, "__dataclass_fields__", {}).get(f.name)
        if declared is not None and _KEY in declared.metadata:
            return declared.metadata[_KEY]
    raise ConfigError(f"option field {cls.__name__}.{f.name} is declared without "
                      "quantbench.options.option(...); give it a help line")


def declaring_classes(cls: type, name: str) -> set[type]:
    """The classes of ``cls``'s MRO that declare field ``name`` with :func:`option` (not those
    that only redeclare its default)."""
    return {k for k in cls.__mro__ if name in k.__dict__.get("__annotations__", {})
            and _KEY in getattr(k, "__dataclass_fields__", {}).get(name, _NO_FIELD).metadata}


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The user options of an options dataclass (recipe keys, API keywords), in order."""
    return [f for f in dataclasses.fields(cls) if not option_spec(cls, f).internal]


def field_type(f: dataclasses.Field) -> tuple[type, bool]:
    """``(bool | int | float | str, optional)`` from the field's annotation (a string under
    ``from __future__ import annotations``, or the type itself)."""
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    parts = [p.strip() for p in annotation.replace("Optional[", "").rstrip("]").split("|")]
    named = [p for p in parts if p != "None"]
    if len(named) != 1 or named[0] not in _TYPES:
        raise ConfigError(f"option {f.name!r} has type {annotation}; options are bool, int, "
                          "float or str (optionally | None)")
    return _TYPES[named[0]], len(named) < len(parts)


def cli_flag(cls: type, f: dataclasses.Field) -> str | None:
    """The long flag that sets field ``f`` of ``cls`` (``--damp``), or None when none does."""
    spec = option_spec(cls, f)
    if not spec.cli:
        return None
    return spec.flag or "--" + f.name.replace("_", "-")


def off_flag(cls: type, f: dataclasses.Field) -> str | None:
    """A bool pair's off spelling (``--no-act-order``, ``--dynamic-groups``); None for a plain
    switch or a non-bool option."""
    spec = option_spec(cls, f)
    if not spec.cli or spec.switch or field_type(f)[0] is not bool:
        return None
    return spec.off_flag or "--no-" + cli_flag(cls, f)[2:]


def option_label(cls: type, f: dataclasses.Field) -> str:
    """How a message names option ``f`` so CLI, recipe and API users all recognise it: the
    flag, with the field name where the flag is not simply its dashed spelling
    (``--damp (damp_percent)``, ``--calib-samples``, ``clip_grid``)."""
    flag = cli_flag(cls, f)
    if flag is None:
        return f.name
    return flag if flag == "--" + f.name.replace("_", "-") else f"{flag} ({f.name})"


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _of_kind(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_values(options: Any) -> None:
    """Refuse a value of another type than its option's annotation (``act_order="no"`` from
    Python would be true) or a number outside its declared ``Range``, in one line naming the
    option and what is accepted; None stays allowed where the field is optional."""
    cls = type(options)
    for f in option_fields(cls):
        kind, optional = field_type(f)
        value = getattr(options, f.name)
        if value is None and optional:
            continue
        allowed = option_spec(cls, f).allowed
        if allowed is not None:
            allowed.check(value, option_label(cls, f))
        elif not _of_kind(value, kind):
            raise ConfigError(f"{option_label(cls, f)} must be {_KINDS[kind]}, got {value!r}")
