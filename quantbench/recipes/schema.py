"""A recipe: jobs (source × methods × bits × formats), one evaluation protocol, a quality gate,
an output directory and an optional Hub target — read from YAML or built in Python, and
checked before any work with one-line errors that name the bad key and what is allowed."""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from quantbench.config import QuantizeConfig, TargetConfig
from quantbench.errors import ConfigError
from quantbench.recipes.parts import (  # noqa: F401  (Gate, Upload, ... re-exported)
    GRID_KEYS, JOB_KEYS, NAME_FIELDS, PAIRS, TOP_KEYS, Evaluation, Gate, RecipeError, Upload,
    _check_options, _evaluation, _gate, _grid_values, _located, _mapping, _one_or_many,
    _option_names, _targets, _tuple, _typed, _upload)


@dataclass(frozen=True)
class Job:
    """One recipe entry; it expands into one artifact per method × bits × type × format.

    ``options`` are method options (``calib_samples``, ``damp_percent``, ``bpw``, ...): each
    method gets those it has; one that no method of the job has is refused.
    """

    methods: tuple[str, ...]
    source: str | None = None
    bits: tuple[int | None, ...] = (None,)
    group_size: int | None = None
    symmetric: bool | None = None
    formats: tuple[str | None, ...] = (None,)
    types: tuple[str | None, ...] = (None,)
    options: Mapping[str, Any] = field(default_factory=dict)
    targets: TargetConfig = field(default_factory=TargetConfig)
    name: str | None = None
    gate: Gate | None = None
    evaluation: Evaluation | None = None
    upload: "Upload | bool | None" = None  # None: the recipe's target; False: never upload
    defaults: Mapping[str, Any] = field(default_factory=dict)  # options that apply if taken

    def __post_init__(self) -> None:
        for name in ("methods", "bits", "formats", "types"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))


@dataclass(frozen=True)
class PlannedJob:
    """One artifact to write: a job entry expanded and checked."""

    name: str
    index: int  # the recipe entry it came from
    source: str
    format: str
    config: QuantizeConfig
    gate: Gate
    evaluation: Evaluation
    upload: Upload | None
    gguf_type: str | None = None

    def settings(self) -> dict[str, Any]:
        grid = self.config.grid
        return {"method": self.config.method, "format": self.format, "type": self.gguf_type,
                "bits": getattr(grid, "bits", None), "group_size": grid.cli_group_size,
                "grid": grid.describe(), "config": self.config.to_dict()}


@dataclass(frozen=True)
class Recipe:
    """Jobs, protocol, gate, output directory and Hub target; checked when built."""

    jobs: tuple[Job, ...]
    output_dir: Path = Path("recipe-out")
    name: str = "recipe"
    source: str | None = None
    evaluation: Evaluation = field(default_factory=Evaluation)
    gate: Gate = field(default_factory=Gate)
    upload: Upload | None = None
    overwrite: bool = False
    verify: bool = True  # false: artifacts are evaluated and uploaded without the checksum check
    report: Path | None = None
    plot: Path | None = None  # a PNG of size against Δppl, one point per job
    origin: str = "recipe"  # the file it was read from, for error messages

    def __post_init__(self) -> None:
        object.__setattr__(self, "jobs", _tuple(self.jobs))
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        for key in ("report", "plot"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, Path(getattr(self, key)))
        if not self.jobs:
            raise RecipeError(f"{self.origin}: 'jobs' is empty; list at least one job")
        self.plan()  # every combination checked now, before any work

    @classmethod
    def load(cls, path: "str | Path") -> "Recipe":
        """Read a YAML recipe file."""
        from quantbench.inputs import read_text

        path = Path(path)
        if not path.exists():
            raise RecipeError(f"recipe {path} does not exist")
        text = read_text(path, RecipeError, "pass a YAML recipe (see examples/recipe.yaml)")
        return cls.from_yaml(text, origin=path.name)

    @classmethod
    def from_yaml(cls, text: str, origin: str = "recipe") -> "Recipe":
        import yaml

        try:
            data = yaml.load(text, Loader=_unique_key_loader())  # noqa: S506  (a SafeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise RecipeError(f"{origin}: not valid YAML{where}: {problem}") from exc
        return cls.from_dict(data, origin=origin)

    @classmethod
    def from_dict(cls, data: Any, origin: str = "recipe") -> "Recipe":
        """A recipe from the mapping a YAML file holds (see ``examples/recipe.yaml``)."""
        return parse_recipe(data, origin)

    def plan(self, fit: "Callable[[str, QuantizeConfig], QuantizeConfig] | None" = None
             ) -> list[PlannedJob]:
        """Every job expanded into the artifacts it writes; impossible ones refused. ``fit``
        (source, config) → config settles what depends on the model (a default group size
        fitted to its rows) before names and upload targets are derived from the config."""
        planned = [p for i, job in enumerate(self.jobs) for p in _expand(self, job, i, fit)]
        _unique(planned, lambda p: p.name, f"{self.origin}: two jobs are named",
                "give one of them a 'name'")
        uploads = [p for p in planned if p.upload is not None]
        _unique(uploads, lambda p: (p.upload.repo, p.upload.revision),
                f"{self.origin}: two jobs upload to", "put {name} in the upload repo")
        return planned

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "origin": self.origin, "output_dir": str(self.output_dir),
                "jobs": [p.name for p in self.plan()]}


def _unique_keys(loader, node, deep: bool = False):
    """A YAML mapping whose keys are all different: YAML itself keeps the last of a key given
    twice, so the first setting would be dropped without a word."""
    import yaml

    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # ``<<: *defaults``: the keys given beside it override those it merges
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)):
            continue  # an unhashable key: construct_mapping refuses it
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


def _unique_key_loader():
    """PyYAML's SafeLoader, refusing a key given twice."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_keys)
    return Loader


def _unique(items: list, key: Callable, what: str, hint: str) -> None:
    seen: set = set()
    for item in items:
        k = key(item)
        if k in seen:
            shown = k if isinstance(k, str) else " @ ".join(str(x) for x in k if x)
            raise RecipeError(f"{what} {shown!r}; {hint}")
        seen.add(k)


# ---------------------------------------------------------------- expansion (Python or YAML)

def _expand(recipe: Recipe, job: Job, index: int,
            fit: "Callable[[str, QuantizeConfig], QuantizeConfig] | None" = None
            ) -> list[PlannedJob]:
    from quantbench.registry import get_format, get_method

    where = f"{recipe.origin}: jobs[{index}]"
    if not job.methods or job.methods == (None,):
        raise RecipeError(f"{where}: no method; add 'method: NAME' (see quantbench list)")
    source = job.source or recipe.source
    if not source:
        raise RecipeError(f"{where}: no source; add 'source:' to the job or the recipe")
    for fmt in job.formats:
        if fmt is not None:
            _located(where + ".format", lambda: get_format(fmt))
    taken = set()
    for m in job.methods:
        taken |= _located(where + ".method", lambda: get_method(m)).option_names(
            {**job.defaults, **job.options})
    unknown = sorted(set(job.options) - taken)
    if unknown:
        raise RecipeError(f"{where}: unknown key {unknown[0]!r}; no method of this job "
                          f"({', '.join(job.methods)}) takes it ({_allowed(taken, JOB_KEYS)})")
    bits_list = job.bits if job.bits != (None,) else _tuple(job.defaults.get("bits"))
    combos = list(itertools.product(job.methods, job.types, bits_list))
    several = len(combos) * len(job.formats) > 1
    planned, seen = [], set()
    for method, gguf_type, bits in combos:
        config = _config(job, method, gguf_type, bits, where)
        config = fit(str(source), config) if fit else config
        for chosen in job.formats:
            fmt = chosen or _default_format(method, gguf_type)
            key = (repr(config.to_dict()), fmt)
            if key in seen:  # e.g. nf4 in a job with bits: [4, 3]: written once
                continue
            seen.add(key)
            base = _auto_name(config, chosen, gguf_type)
            name = (f"{job.name}-{base}" if several else job.name) if job.name else base
            planned.append(PlannedJob(
                name=name, index=index, source=str(source), format=fmt, config=config,
                gate=job.gate if job.gate is not None else recipe.gate,
                evaluation=job.evaluation or recipe.evaluation,
                upload=_upload_for(job, recipe, name, config, fmt, gguf_type, source, where),
                gguf_type=gguf_type))
    return planned


def _allowed(options: set[str], keys: tuple[str, ...]) -> str:
    return f"job keys: {', '.join(keys)}; method options: {', '.join(sorted(options)) or 'none'}"


def _config(job: Job, method: str, gguf_type: str | None, bits: int | None,
            where: str) -> QuantizeConfig:
    """``make_config`` with the options this method has. Grid values from ``defaults``, and
    bits/group size shared by several methods of one job, apply where the method's grid takes
    them (a GGUF type or nf4/llm_int8 keep their own, as ``compare`` does); a job's own value
    for its only method is never dropped."""
    from quantbench.quant.run import make_config
    from quantbench.registry import get_method

    cls = get_method(method)
    given = {**job.defaults, **job.options}
    fields = cls.option_names(given)  # awq: its own and those of its ``then`` method
    options = {k: v for k, v in given.items() if k in fields}
    grid = {"bits": bits, "group_size": job.group_size, "symmetric": job.symmetric}
    loose = {k for k in ("group_size", "symmetric")
             if grid[k] is None and job.defaults.get(k) is not None}
    grid.update({k: job.defaults[k] for k in loose})
    if job.bits == (None,) and bits is not None:
        loose.add("bits")
    if len(job.methods) > 1 and cls.fixed_bits is not None:
        loose |= {"bits", "group_size"}

    def make(values: dict[str, Any]) -> QuantizeConfig:
        return make_config(method, values["bits"], values["group_size"], values["symmetric"],
                           job.targets, gguf_type=gguf_type, **options)

    try:
        return make(grid)
    except ConfigError as exc:
        if loose:
            try:
                return make({**grid, **{k: None for k in loose}})
            except ConfigError:
                pass
        raise RecipeError(f"{where} ({method}): {exc}") from exc


def _default_format(method: str, gguf_type: str | None) -> str:
    """As ``quantbench convert`` chooses: gguf with a type, exl2 for exl2, else dense."""
    return "gguf" if gguf_type else "exl2" if method == "exl2" else "dense"


def _auto_name(config: QuantizeConfig, fmt: str | None, gguf_type: str | None) -> str:
    """``method-wBITS-gGROUP`` (``method-TYPE`` for GGUF, ``exl2-4.5bpw``), then the format
    when one was chosen that the method's name does not already say."""
    grid = config.grid
    if gguf_type:
        base = f"{config.method}-{gguf_type}"
    elif getattr(grid, "bpw", None) is not None:
        base = f"{config.method}-{grid.bpw:g}bpw"
    else:
        group = {-1: "ch", 0: "t"}.get(grid.cli_group_size, f"g{grid.cli_group_size}")
        base = f"{config.method}-w{grid.bits}-{group}"
        if getattr(config.options, "double_quant", False):
            base += "-dq"
    implied = fmt is None or fmt == config.method or (fmt == "gguf" and gguf_type)
    return base if implied else f"{base}-{fmt}"


def _upload_for(job: Job, recipe: Recipe, name: str, config: QuantizeConfig, fmt: str,
                gguf_type: str | None, source: str, where: str) -> Upload | None:
    target = recipe.upload if job.upload is None else job.upload
    if target is None or target is False:
        return None
    if target is True:
        if recipe.upload is None:
            raise RecipeError(f"{where}.upload: 'true' needs a recipe-level 'upload:' target")
        target = recipe.upload
    values = {"name": name, "method": config.method, "bits": getattr(config.grid, "bits", ""),
              "group_size": config.grid.cli_group_size, "format": fmt, "type": gguf_type or "",
              "source": Path(str(source).split(":")[-1]).name}
    try:
        repo = target.repo.format(**values)
    except (KeyError, IndexError, ValueError) as exc:
        raise RecipeError(f"{where}.upload.repo: {target.repo!r} has an unknown placeholder "
                          f"({exc}); allowed: {', '.join('{' + k + '}' for k in NAME_FIELDS)}"
                          ) from exc
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise RecipeError(f"{where}.upload.repo: expected 'user/name', got {repo!r}")
    return dataclasses.replace(target, repo=repo)


# ------------------------------------------------------------------------ reading a mapping
# A recipe's YAML mapping turned into ``Recipe`` objects, every key and type checked, with
# one-line errors that name the key and what is allowed. (Here, not in a module of its own:
# ``Recipe.from_dict`` needs the parser and the parser builds a ``Recipe``.)

def _job(data: Any, where: str, defaults: Mapping[str, Any], recipe: dict[str, Any]) -> Job:
    """One job entry; ``defaults`` fill what it leaves out (grid values and method options
    only where the method takes them)."""
    options = _option_names()
    data = _mapping(data, where, JOB_KEYS + options)
    _check_options(data, where)
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
    _check_options(defaults, f"{origin}: defaults")
    recipe = {"gate": _gate(data.get("gate"), f"{origin}: gate"),
              "evaluation": _evaluation(data.get("eval"), f"{origin}: eval"),
              "upload": _upload(data.get("upload"), f"{origin}: upload")}
    if isinstance(recipe["upload"], bool):
        raise RecipeError(f"{origin}: upload: expected a mapping with 'repo', got "
                          f"{recipe['upload']!r}")
    jobs = tuple(_job(j, f"{origin}: jobs[{i}]", defaults, recipe)
                 for i, j in enumerate(data["jobs"]))
    for key in ("name", "source", "output_dir", "report", "plot"):
        if data.get(key) is not None:
            _typed(data[key], f"{origin}: {key}", "str")
    overwrite, verify = (_typed(data[key], f"{origin}: {key}", "bool") if key in data
                         else default for key, default in (("overwrite", False), ("verify", True)))
    return Recipe(jobs=jobs, output_dir=Path(data.get("output_dir") or "recipe-out"),
                  name=data.get("name") or Path(origin).stem, source=data.get("source"),
                  overwrite=overwrite, verify=verify, report=data.get("report"), plot=data.get("plot"),
                  origin=origin,
                  **recipe)
