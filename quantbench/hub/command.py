"""The ``quantbench convert`` command line of an artifact: as the CLI parsed it (recorded in the
manifest by ``convert``), or rebuilt from the manifest's quantize config (older manifests and
artifacts written from Python)."""
from __future__ import annotations

import dataclasses
from typing import Any

import click

from quantbench.cli_options import method_params
from quantbench.config import grid_from_dict
from quantbench.errors import QuantbenchError


def _long(opts: list[str]) -> str:
    return max(opts, key=len)


def option_args(param: click.Parameter, value: Any) -> list[str]:
    """``param`` set to ``value`` as command-line words (long option names)."""
    if isinstance(param, click.Argument):
        return [str(value)]
    flag = _long(param.opts)
    if getattr(param, "multiple", False):
        return [word for item in value for word in (flag, str(item))]
    if getattr(param, "is_flag", False):
        if param.secondary_opts:
            return [flag] if value else [_long(param.secondary_opts)]
        return [flag] if value else []
    return [flag, str(value)]


def argv_from_context(ctx: click.Context) -> list[str]:
    """The running command as argv: every parameter given on the command line, in the order
    the command declares them (``-m gptq`` becomes ``--method gptq``; the meaning is the
    user's, word for word up to option spelling and order)."""
    from click.core import ParameterSource

    argv = ["quantbench", ctx.info_name or ctx.command.name or ""]
    for param in ctx.command.params:
        if param.name not in ctx.params or \
                ctx.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE:
            continue
        argv += option_args(param, ctx.params[param.name])
    return argv


def _grid_args(grid: dict[str, Any]) -> list[str]:
    kind = grid.get("kind", "int")
    if kind == "gguf":
        return ["--type", str(grid["type"])]
    if kind == "int":
        g = grid_from_dict(grid)
        return ["--bits", str(g.bits), "--group-size", str(g.cli_group_size),
                "--symmetric" if g.symmetric else "--zero-point"]
    if kind == "codebook":  # the codebook is the method (nf4/fp4); double quant an option
        return ["--group-size", str(grid["block_size"])]
    if kind == "exl2" and grid.get("bpw") is None and len(grid.get("widths", ())) == 1:
        return ["--bits", str(grid["widths"][0]), "--group-size", str(grid["group_sizes"][0])]
    return []  # int8 rows, an exl2 bpw target (--bpw is a method option)


def _target_args(targets: dict[str, Any], gguf: bool) -> list[str]:
    args = [w for pattern in targets.get("include", ()) for w in ("--include", pattern)]
    args += [w for pattern in targets.get("exclude", ()) for w in ("--exclude", pattern)]
    if not gguf:  # --type quantizes embeddings and lm_head by itself
        args += ["--quantize-embeddings"] if targets.get("embeddings") else []
        args += ["--quantize-lm-head"] if targets.get("lm_head") else []
    return args


def _option_args(method: str, options: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Options that differ from the method's defaults, as flags; and those no flag sets."""
    from quantbench.registry import get_method

    try:
        defaults = dataclasses.asdict(get_method(method).options_cls())
    except QuantbenchError:  # a method this quantbench does not know: keep every option
        defaults = {}
    params = method_params()
    args: list[str] = []
    unset: dict[str, Any] = {}
    for name, value in options.items():
        if name in defaults and defaults[name] == value:
            continue
        if name in params:
            args += option_args(params[name], value)
        else:
            unset[name] = value
    return args, unset


def convert_argv(manifest: dict[str, Any], output: str) -> tuple[list[str], dict[str, Any]]:
    """``quantbench convert`` argv that redoes ``manifest``'s run into ``output``, and the
    options that have no command-line flag (Python API only) with their values."""
    source = (manifest.get("source") or {}).get("id") or "SOURCE"
    q = manifest.get("quantize") or {}
    method = q.get("method", "zeropoint")
    grid = q.get("grid") or {}
    argv = ["quantbench", "convert", str(source), "--method", method, *_grid_args(grid),
            *_target_args(q.get("targets") or {}, grid.get("kind") == "gguf")]
    options, unset = _option_args(method, q.get("options") or {})
    argv += options
    argv += ["--format", str(manifest.get("format", "dense")), "--output", output]
    return argv, unset


def eval_argv(manifest: dict[str, Any], target: str) -> list[str]:
    """``quantbench eval`` argv with the protocol the manifest's evaluation used."""
    protocol = (manifest.get("eval") or {}).get("protocol") or {}
    argv = ["quantbench", "eval", target]
    flags = (("ctx", "--ctx"), ("n_windows", "--windows"), ("scoring", "--scoring"),
             ("data", "--data"))
    for key, flag in flags:
        if protocol.get(key) is not None:
            argv += [flag, str(protocol[key])]
    if "max_tokens" in protocol:
        argv += ["--max-tokens", str(protocol["max_tokens"] or 0)]
    return argv
