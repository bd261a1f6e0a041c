"""A checkpoint checked against its config before any work: every tensor the config implies
exists with the implied shape, and nothing else is there.

The expectation is data: the architecture's ``shapes`` (each module's weight shape as products
of config keys), ``linears``/``norms`` (what every block holds), ``biases`` (which linears carry
one under which config flag), tied embeddings. Only names and shapes are compared (safetensors
headers, a GGUF's tensor infos), so this costs nothing next to reading the weights. The first
disagreement is refused in one line naming the tensor, both shapes and the config keys.

What is not refused: a module of ``linears``/``norms`` with no ``shapes`` entry is only
required to exist (a family whose shapes are not declared still loads); buffers the model
recomputes from its config (``ArchSpec.derived_buffers``: rotary ``inv_freq`` that older
transformers saved) are logged and skipped; so is an ``lm_head`` equal to the embeddings of a
tied model (read and compared only in that case).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

from quantbench.errors import ModelLoadError
from quantbench.models.arch import ArchSpec, config_value

log = logging.getLogger(__name__)

Shape = tuple[int | None, ...]


@dataclass(frozen=True)
class Expected:
    """One tensor the config implies: its shape (None: only its presence is known; a None
    dimension is not checked) and the config expressions each dimension comes from."""

    shape: Shape | None
    dims: tuple[str, ...] = ()


@dataclass(frozen=True)
class Context:
    """How a refusal names things: ``where`` the checkpoint is, ``show`` a tensor's name as
    the user's file spells it, ``keys`` a config key as the user's file spells it."""

    where: str
    show: Callable[[str], str] = str
    keys: Mapping[str, str] | None = None
    config_file: str = "config.json"

    def key(self, key: str) -> str:
        return (self.keys or {}).get(key, key)

    def fail(self, message: str) -> ModelLoadError:
        return ModelLoadError(f"{self.where}: {message}" if self.where else message)


def positive_int(config: Mapping, key: str, ctx: Context, needed_for: str) -> int:
    """``config[key]`` as a positive int (``head_dim``/kv heads defaulted as transformers
    does); refuses a missing key or another value."""
    value = config_value(dict(config), key)
    if value is None:
        raise ctx.fail(f"{ctx.config_file} has no {ctx.key(key)!r}, which {needed_for} needs; "
                       "add it (see the model's original config)")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ctx.fail(f"{ctx.config_file} {ctx.key(key)!r} is {value!r}, not a positive "
                       f"integer ({needed_for} needs it); fix it")
    return value


_KINDS = {
    "positive": ("a positive number", lambda v: isinstance(v, (int, float))
                 and not isinstance(v, bool) and math.isfinite(v) and v > 0),
    "count": ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool)
              and v > 0),
    "flag": ("true or false", lambda v: isinstance(v, bool)),
}


def _nested(config: Mapping, dotted: str):
    value = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def check_hyperparameters(config: Mapping, arch: ArchSpec, ctx: Context) -> None:
    """The scalar values the forward and the format writers read (norm epsilon, RoPE base,
    context length, flags) are of their kind where present: a string or a negative epsilon
    would otherwise be copied into an artifact no runtime loads, or fail mid-write."""
    for key, kind in arch.hyperparameters:
        value = _nested(config, key)
        if value is None:
            continue
        what, ok = _KINDS[kind]
        if not ok(value):
            raise ctx.fail(f"{ctx.config_file} {ctx.key(key)!r} is {value!r}, not {what}; "
                           "fix it (see the model's original config)")


def _dim(config: Mapping, expr: str, ctx: Context, tensor: str) -> int:
    n = 1
    for key in expr.split("*"):
        n *= positive_int(config, key, ctx, f"the shape of {ctx.show(tensor)}")
    return n


def _describe(config: Mapping, dims: Sequence[str], ctx: Context) -> str:
    """``num_key_value_heads*head_dim=2*16, hidden_size=64``."""
    def show(expr: str, render) -> str:  # a sum of products of keys (fused projections)
        return "+".join("*".join(render(k) for k in term.split("*"))
                        for term in expr.split("+"))

    def value(key: str) -> str:
        return str(config_value(dict(config), key))

    return ", ".join(f"{show(expr, ctx.key)}={show(expr, value)}" for expr in dims)


def tied(config: Mapping, arch: ArchSpec) -> bool:
    """Whether the config ties lm_head to the embeddings (absent: the family's default)."""
    value = config.get("tie_word_embeddings")
    return arch.tied_by_default if value is None else value is True


def _module_shape(config: Mapping, arch: ArchSpec, module: str, tensor: str,
                  ctx: Context) -> Expected:
    table = dict(arch.shapes)
    if module in table:
        dims = table[module]
        return Expected(tuple(_dim(config, d, ctx, tensor) for d in dims), dims)
    fused = arch.fused_parts(module)
    if fused is not None:  # the rows are the parts' sum; the input width is not declared
        dims = ("+".join(size for _, size in fused.parts),)
        rows = sum(_dim(config, size, ctx, tensor) for _, size in fused.parts)
        return Expected((rows, None), dims)
    return Expected(None)


def expected_tensors(config: Mapping, arch: ArchSpec, ctx: Context) -> dict[str, Expected]:
    """Every tensor a checkpoint of this config holds, in checkpoint order (embeddings,
    block by block, final norm, lm_head unless tied); a multimodal wrapper's passthrough parts
    (vision tower) are not listed: their layout is the vision model's, not checked here."""
    return _expected(arch.hparams(dict(config)), arch, _in_section(ctx, arch))


def _in_section(ctx: Context, arch: ArchSpec) -> Context:
    """``ctx`` naming config keys inside a multimodal wrapper's ``text_config``."""
    if arch.config_section is None or ctx.keys is not None:
        return ctx
    return replace(ctx, keys=_SectionKeys(arch.config_section))


class _SectionKeys(Mapping):
    """``key`` → ``section.key`` (how a refusal spells a key of a nested config object)."""

    def __init__(self, section: str):
        self.section = section

    def __getitem__(self, key: str) -> str:
        return f"{self.section}.{key}"

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 1  # truthy: Context.key consults it


def _expected(config: Mapping, arch: ArchSpec, ctx: Context) -> dict[str, Expected]:
    n_blocks = positive_int(config, arch.num_blocks_key, ctx, "the number of layers")
    _check_heads(config, arch, ctx)
    out: dict[str, Expected] = {}

    def add(module: str, relative: str) -> Expected:
        name = f"{module}.weight"
        out[name] = _module_shape(config, arch, relative, name, ctx)
        return out[name]

    add(arch.embed, arch.embed)
    with_bias = [lin for flag, lins in arch.biases
                 if flag is None or config.get(flag) for lin in lins]
    for index in range(n_blocks):
        for relative in dict.fromkeys(arch.linears + arch.norms + arch.kept):
            module = arch.block_module(index, relative)
            weight = add(module, relative)
            if relative in with_bias:
                rows = weight.shape[0] if weight.shape else None
                out[f"{module}.bias"] = Expected(None if rows is None else (rows,),
                                                 weight.dims[:1])
    add(arch.final_norm, arch.final_norm)
    if not tied(config, arch):
        add(arch.lm_head, arch.lm_head)
    return out


def _check_heads(config: Mapping, arch: ArchSpec, ctx: Context) -> None:
    """Attention heads must split evenly over the kv heads (grouped-query attention)."""
    if config.get(arch.heads_key) is None:
        return  # a family without these keys: its shapes say what they need
    heads = positive_int(config, arch.heads_key, ctx, "attention")
    kv = positive_int(config, arch.kv_heads_key, ctx, "attention") \
        if config.get(arch.kv_heads_key) is not None else heads
    if heads % kv:
        raise ctx.fail(f"{ctx.config_file} {ctx.key(arch.heads_key)}={heads} is not a multiple "
                       f"of {ctx.key(arch.kv_heads_key)}={kv}; fix the config")


def check_tensors(config: Mapping, arch: ArchSpec,
                  shapes: Mapping[str, Sequence[int] | None], ctx: Context,
                  tied_copy: Callable[[], bool] | None = None) -> list[str]:
    """Refuse the first disagreement between ``shapes`` (the checkpoint's tensor names and
    shapes; None: a shape not known yet) and what ``config`` implies; return the names to
    skip (derived buffers, an lm_head that ``tied_copy()`` says equals the tied embeddings).
    A multimodal wrapper's passthrough tensors (``ArchSpec.passthrough``) are let through."""
    config, ctx = arch.hparams(dict(config)), _in_section(ctx, arch)
    check_hyperparameters(config, arch, ctx)
    expected = _expected(config, arch, ctx)
    _check_layer_count(config, arch, shapes, ctx)
    skip = _check_tied(config, arch, shapes, ctx, tied_copy)
    for name, want in expected.items():
        if name not in shapes:
            raise ctx.fail(f"tensor {ctx.show(name)} is missing ({ctx.config_file} implies it"
                           f"{_why(name, arch, config, ctx)}); the checkpoint is incomplete or "
                           "its config does not belong to it")
        if shapes[name] is None:
            continue
        got = tuple(int(d) for d in shapes[name])
        if want.shape is not None and not _fits(got, want.shape):
            raise ctx.fail(f"tensor {ctx.show(name)} has shape {list(got)}, {ctx.config_file} "
                           f"implies {_show_shape(want.shape)} "
                           f"({_describe(config, want.dims, ctx)}); {ctx.config_file} does not "
                           "match the weights")
    for name in shapes:
        if name in expected or name in skip or arch.passthrough_part(name) is not None:
            continue
        if any(re.search(p, name) for p in arch.derived_buffers):
            log.info("skipping %s: a buffer the model recomputes from its config", name)
            skip.append(name)
            continue
        raise ctx.fail(f"tensor {ctx.show(name)} is not part of a {arch.family} model as "
                       f"{ctx.config_file} describes it{_why_not(name, arch, config, ctx)}; "
                       f"remove it or fix {ctx.config_file}")
    return skip


def _fits(got: tuple[int, ...], want: Shape) -> bool:
    return len(got) == len(want) and all(w is None or g == w for g, w in zip(got, want))


def _show_shape(shape: Shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _check_layer_count(config: Mapping, arch: ArchSpec, shapes: Mapping, ctx: Context) -> None:
    n = int(config[arch.num_blocks_key])
    present = {arch.block_of(name) for name in shapes} - {None}
    if present and max(present) >= n:
        last = ctx.show(arch.block_module(max(present), "*"))
        raise ctx.fail(f"the weights hold {max(present) + 1} layers (up to {last}) but "
                       f"{ctx.config_file} {ctx.key(arch.num_blocks_key)} is {n}; "
                       f"{ctx.config_file} does not match the weights")
    if len(present) < n:
        first = min(set(range(n)) - present)
        raise ctx.fail(f"{ctx.config_file} {ctx.key(arch.num_blocks_key)} is {n} but the weights "
                       f"hold {len(present)} layers (none for layer {first}); the checkpoint is "
                       "incomplete or its config does not belong to it")


def _check_tied(config: Mapping, arch: ArchSpec, shapes: Mapping, ctx: Context,
                tied_copy: Callable[[], bool] | None) -> list[str]:
    head = f"{arch.lm_head}.weight"
    if not tied(config, arch) or head not in shapes:
        return []
    if tied_copy is not None and tied_copy():
        log.info("skipping %s: a copy of the tied embeddings", head)
        return [head]
    raise ctx.fail(f"{ctx.config_file} ties the embeddings ({ctx.key('tie_word_embeddings')}) "
                   f"but the weights hold a separate {ctx.show(head)} that runtimes would "
                   "ignore; set tie_word_embeddings to false if the model uses it")


def _why(name: str, arch: ArchSpec, config: Mapping, ctx: Context) -> str:
    if name == f"{arch.lm_head}.weight":
        return ": tie_word_embeddings is false"
    for flag, linears in arch.biases:
        if any(name.endswith(f".{lin}.bias") for lin in linears):
            return f": {ctx.key(flag)} is {config.get(flag)!r}" if flag else \
                f": every {arch.family} model has it"
    return ""


def _why_not(name: str, arch: ArchSpec, config: Mapping, ctx: Context) -> str:
    for flag, linears in arch.biases:
        if flag and any(name.endswith(f".{lin}.bias") for lin in linears):
            return f" ({ctx.config_file} {ctx.key(flag)} is {config.get(flag, False)!r})"
    return ""
