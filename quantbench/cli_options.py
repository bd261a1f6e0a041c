"""The method options of ``quantbench convert`` (and ``compare``) as click options, generated
from the registered methods' options dataclasses (``quantbench/options.py`` declares each field's
flag and help): shared by the CLI (``cli.py``) and the command line rebuilt from a manifest
(``hub/command.py``), so neither imports the other.

One flag per option name over every registered method (``calib_samples`` is one
``--calib-samples`` for gptq, awq, imatrix, ...); its help names the methods that take it and
their defaults. Every flag defaults to None ("not given"): the method's own default applies, and
naming an option the method lacks is refused (``Method.check_options``).
"""
from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import click

from quantbench.errors import ConfigError
from quantbench.options import (cli_flag, declaring_classes, field_type, off_flag,
                                option_fields, option_spec)
from quantbench.registry import get_method, method_names

# The order methods' flags appear in ``--help`` (a method not listed follows, by name).
HELP_ORDER = ("gptq", "awq", "imatrix", "exl2", "nf4", "fp4", "llm_int8")


@dataclass(frozen=True)
class MethodFlag:
    """One command-line option for the option field ``name`` of the methods ``owners``."""

    name: str
    flag: str                       # ``--damp``
    off: str | None                 # a bool pair's off spelling
    kind: type                      # bool, int, float or str
    choices: tuple[str, ...] | None
    help: str
    owners: tuple[str, ...]
    defaults: tuple[Any, ...]       # each owner's default, in ``owners`` order

    @property
    def spelling(self) -> str:
        """How messages name it: ``--damp``; a pair with its own off name in full
        (``--static-groups/--dynamic-groups``)."""
        if self.off and self.off != "--no-" + self.flag[2:]:
            return f"{self.flag}/{self.off}"
        return self.flag

    def click_option(self) -> Callable:
        text = _help(self)
        if self.kind is bool and self.off is None:
            return click.option(self.flag, self.name, is_flag=True, default=None, help=text)
        if self.kind is bool:
            return click.option(f"{self.flag}/{self.off}", self.name, default=None, help=text)
        kind = click.Choice(list(self.choices)) if self.choices else self.kind
        return click.option(self.flag, self.name, type=kind, default=None, help=text)


def _methods() -> list[str]:
    names = method_names()
    return [m for m in HELP_ORDER if m in names] + [m for m in names if m not in HELP_ORDER]


def _own_first(cls: type) -> list[dataclasses.Field]:
    """``cls``'s option fields, those it declares itself first."""
    own = cls.__dict__.get("__annotations__", {})
    fields = option_fields(cls)
    return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]


def _choices(cls: type, choices: Any) -> tuple[str, ...] | None:
    if choices is None:
        return None
    return tuple(getattr(cls, choices) if isinstance(choices, str) else choices)


@functools.cache
def method_flags() -> tuple[MethodFlag, ...]:
    """Every method option that has a flag, once per field name, in ``--help`` order."""
    found: dict[str, list[tuple[str, type, dataclasses.Field]]] = {}
    for method in _methods():
        cls = get_method(method).options_cls
        for f in _own_first(cls):
            if cli_flag(cls, f) is not None:
                found.setdefault(f.name, []).append((method, cls, f))
    return tuple(_merge(name, uses) for name, uses in found.items())


def _merge(name: str, uses: list[tuple[str, type, dataclasses.Field]]) -> MethodFlag:
    """One flag for a field several methods have; they must agree on how it is spelled."""
    shapes = {(cli_flag(cls, f), off_flag(cls, f), field_type(f)[0]) for _, cls, f in uses}
    if len(shapes) > 1:
        raise ConfigError(f"option {name!r} is declared differently by "
                          f"{', '.join(m for m, _, _ in uses)}: {sorted(map(str, shapes))}")
    flag, off, kind = shapes.pop()
    choices: list[str] = []
    for _, cls, f in uses:
        choices += [c for c in _choices(cls, option_spec(cls, f).choices) or () if c not in choices]
    _, first_cls, first = uses[0]
    return MethodFlag(name, flag, off, kind, tuple(choices) or None,
                      option_spec(first_cls, first).help, tuple(m for m, _, _ in uses),
                      tuple(f.default for _, _, f in uses))


def _shared(flag: MethodFlag) -> bool:
    """Whether the option comes from a base class several methods share (the calibration
    windows, the device), not from one method's own options: its help names no method."""
    classes = [get_method(m).options_cls for m in flag.owners]
    declared = set().union(*(declaring_classes(cls, flag.name) for cls in classes))
    return len(flag.owners) > 1 and not declared & set(classes)


def _value(flag: MethodFlag, value: Any) -> str:
    if flag.kind is bool and flag.off:
        if flag.spelling != flag.flag:
            return flag.flag if value else flag.off
        return "on" if value else "off"
    return str(value)


def _default_note(flag: MethodFlag) -> str:
    """``default 128; awq 32, imatrix 64`` (one default, then the methods that differ);
    empty where the default is None or a switch's off."""
    pairs = [(m, d) for m, d in zip(flag.owners, flag.defaults)
             if d is not None and not (flag.kind is bool and flag.off is None and d is False)]
    if not pairs:
        return ""
    counts = Counter(_value(flag, d) for _, d in pairs)
    common, n = counts.most_common(1)[0]
    if len(counts) == 1:
        return f"default {common}"
    if n == 1:
        return "default: " + ", ".join(f"{m} {_value(flag, d)}" for m, d in pairs)
    others = ", ".join(f"{m} {_value(flag, d)}" for m, d in pairs if _value(flag, d) != common)
    return f"default {common}; {others}"


def _help(flag: MethodFlag) -> str:
    text = flag.help
    if not _shared(flag):
        word = text.split()[0]
        lower = text if len(word) > 1 and word.isupper() else text[:1].lower() + text[1:]
        text = f"{'/'.join(flag.owners)}: {lower}"
    note = _default_note(flag)
    if note:
        text = f"{text.rstrip('.')} ({note})."
    return text


class MethodOptionsCommand(click.Command):
    """A command that takes every method option (``convert``, ``compare``): they are added
    after its own options the first time click needs its parameters (to parse its arguments
    or print its help), not when the CLI is imported, so the other commands import no
    method."""

    _method_options_added = False

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not self._method_options_added:
            self._method_options_added = True
            self.params.extend(reversed(calibration_options(lambda: None).__click_params__))
        return super().get_params(ctx)


def calibration_options(f):
    """The method options of ``quantbench convert`` (each a field of a method's options
    dataclass), as click options on ``f``."""
    for flag in reversed(method_flags()):
        f = flag.click_option()(f)
    return f


@functools.cache
def flag_names() -> dict[str, str]:
    """``{option field name: its flag as messages spell it}`` (``damp_percent: --damp``)."""
    return {flag.name: flag.spelling for flag in method_flags()}


def method_params() -> dict[str, click.Parameter]:
    """``{option field name: click parameter}`` for every option :func:`calibration_options`
    adds (what ``convert`` parses a method option with)."""
    return {p.name: p for p in calibration_options(lambda: None).__click_params__}
