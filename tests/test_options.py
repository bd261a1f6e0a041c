"""One source of truth for method options: the options dataclasses' fields
(``quantbench/options.py``) give the CLI flags, the recipe keys and the API keywords."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import click
import pytest
from click.testing import CliRunner

from quantbench import cli_options, registry
from quantbench.cli import compare, convert
from quantbench.cli_options import calibration_options, flag_names, method_flags, method_params
from quantbench.config import MethodOptions, QuantizeConfig
from quantbench.errors import ConfigError
from quantbench.options import cli_flag, field_type, off_flag, option, option_fields, option_spec
from quantbench.quant.methods.base import Method
from quantbench.quant.run import make_config
from quantbench.registry import get_method, method_names
from quantbench.recipes.schema import RecipeError, _option_names, parse_recipe

# The method flags of `quantbench convert` and `compare` as users and scripts spell them
# (recorded from the hand-written table these are now generated to replace): dest, flag(s),
# click type, is_flag. Every one defaults to None (not given).
RECORDED = [
    ("act_order", "--act-order/--no-act-order", "boolean", True),
    ("attention_values", "--attention-values/--input-values", "boolean", True),
    ("block_size", "--block-size", "integer", False),
    ("bpw", "--bpw", "float", False),
    ("calib_chat_template", "--calib-chat-template", "boolean", True),
    ("calib_data", "--calib-data", "text", False),
    ("calib_len", "--calib-len", "integer", False),
    ("calib_samples", "--calib-samples", "integer", False),
    ("calib_seed", "--seed", "integer", False),
    ("clip", "--clip/--no-clip", "boolean", True),
    ("damp_percent", "--damp", "float", False),
    ("device", "--device", "text", False),
    ("double_quant", "--double-quant", "boolean", True),
    ("exhaustive", "--exhaustive-search", "boolean", True),
    ("expert_min_tokens", "--expert-min-tokens", "integer", False),
    ("float_targets", "--float-targets/--no-float-targets", "boolean", True),
    ("imatrix_file", "--imatrix", "text", False),
    ("measure_samples", "--measure-samples", "integer", False),
    ("measurement", "--measurement", "text", False),
    ("n_grid", "--awq-grid", "integer", False),
    ("router_weighted", "--router-weighted/--no-router-weighted", "boolean", True),
    ("scale_search", "--scale-search/--no-scale-search", "boolean", True),
    ("search_file", "--search-file", "text", False),
    ("search_samples", "--search-samples", "integer", False),
    ("static_groups", "--static-groups/--dynamic-groups", "boolean", True),
    ("then", "--then", "choice:rtn|gptq", False),
    ("threshold", "--threshold", "float", False),
]
# Options the Python API and recipes take but no flag sets (declared with cli=False).
API_ONLY = {"batch_size", "clip_grid", "clip_tokens", "duo_scaling", "max_shrink"}


def _describe(p: click.Parameter) -> tuple:
    kind = (f"choice:{'|'.join(p.type.choices)}" if isinstance(p.type, click.Choice)
            else p.type.name)
    return (p.name, "/".join(p.opts + p.secondary_opts), kind, p.is_flag)


def _option_fields():
    """(method, options class, field) for every option of every registered method."""
    for m in method_names():
        cls = get_method(m).options_cls
        for f in option_fields(cls):
            yield m, cls, f


@pytest.mark.parametrize("command", [convert, compare], ids=["convert", "compare"])
def test_the_flags_users_type_are_unchanged(command):
    """(The method options join the command's parameters when click first asks for them.)"""
    params = {p.name: p for p in command.get_params(click.Context(command))
              if p.name in method_params()}
    assert sorted(_describe(p) for p in params.values()) == RECORDED
    assert all(p.default is None for p in params.values())  # None: not given


def test_every_option_field_has_help_and_a_flag_or_is_api_only():
    api_only = set()
    for m, cls, f in _option_fields():
        spec = option_spec(cls, f)
        assert spec.help.strip(), f"{m}.{f.name} has no help"
        field_type(f)  # bool, int, float or str (optionally None)
        flag = cli_flag(cls, f)
        if flag is None:
            api_only.add(f.name)
            continue
        param = method_params()[f.name]  # the flag sets this field, under the field's name
        assert flag in param.opts
        assert off_flag(cls, f) in (param.secondary_opts or [None])
        assert param.help and len(param.help) > len(spec.help) / 2
    assert api_only == API_ONLY
    flagged = {name for name, _, _, _ in RECORDED}
    assert set(method_params()) == flagged  # no hand-written flag for a field no method has
    assert flagged | API_ONLY == {f.name for _, _, f in _option_fields()}


def test_help_names_the_methods_and_their_defaults():
    params = method_params()
    assert params["calib_samples"].help.startswith("Calibration windows (default 128; awq 32")
    assert "imatrix 64" in params["calib_samples"].help
    assert "llm_int8 16" in params["calib_samples"].help
    assert params["block_size"].help.startswith("gptq/exl2: ")
    assert "gptq 128, exl2 32" in params["block_size"].help
    assert params["act_order"].help.startswith("gptq: ")
    assert params["act_order"].help.endswith("(default on).")
    assert params["static_groups"].help.endswith("(default --static-groups).")
    assert params["then"].help.startswith("awq: ")
    assert params["double_quant"].help.startswith("nf4/fp4: ")


def _parse(args: list[str]) -> dict:
    @click.command()
    @calibration_options
    def probe(**given):
        probe.given = given

    result = CliRunner().invoke(probe, args, standalone_mode=False)
    assert result.exception is None, result.output
    return {k: v for k, v in probe.given.items() if v is not None}


def _other_value(cls: type, f: dataclasses.Field):
    """A valid value of field ``f`` that is not its default."""
    kind, _ = field_type(f)
    spec = option_spec(cls, f)
    if spec.choices is not None:
        choices = getattr(cls, spec.choices) if isinstance(spec.choices, str) else spec.choices
        return next(c for c in choices if c != f.default)
    if kind is bool:
        return not f.default
    if kind is int:
        return (f.default or 0) + 3
    if kind is float:
        return 4.5 if f.default is None else f.default / 2  # 4.5: a valid --bpw
    return f"{f.name}-value"


@pytest.mark.parametrize("method", [m for m in method_names()
                                    if option_fields(get_method(m).options_cls)])
def test_flag_keyword_and_manifest_round_trip(method):
    """Each option: its flag parses to the field's keyword, ``make_config`` sets the field,
    and the config's dict reads back equal."""
    cls = get_method(method).options_cls
    for f in option_fields(cls):
        value = _other_value(cls, f)
        config = make_config(method, **{f.name: value})
        assert getattr(config.options, f.name) == value, f.name
        assert QuantizeConfig.from_dict(config.to_dict()) == config
        flag = cli_flag(cls, f)
        if flag is None:
            continue
        if isinstance(value, bool):
            args = [flag] if value else [off_flag(cls, f)]
        else:
            args = [flag, str(value)]
        assert _parse(args) == {f.name: value}


def test_awq_then_gptq_takes_every_gptq_option():
    gptq = get_method("gptq").options_cls
    for f in option_fields(gptq):
        if f.name in {g.name for g in option_fields(get_method("awq").options_cls)}:
            continue  # shared (calibration windows, device): the transform's own
        value = _other_value(gptq, f)
        config = make_config("awq", then="gptq", **{f.name: value})
        assert getattr(config.options.inner, f.name) == value, f.name
        assert config.options.to_dict()[f.name] == value


def test_recipe_keys_are_the_option_fields():
    assert set(_option_names()) == {f.name for _, _, f in _option_fields()}
    assert "inner" not in _option_names()  # a transform's built inner options, no key
    recipe = parse_recipe({"source": "x", "jobs": [{"method": "gptq", "damp_percent": 0.05,
                                                     "attention_values": None}]}, "r.yaml")
    assert recipe.jobs[0].options == {"damp_percent": 0.05, "attention_values": None}
    with pytest.raises(RecipeError, match="damp_percent: expected a number"):
        parse_recipe({"source": "x", "jobs": [{"method": "gptq", "damp_percent": "0.05"}]},
                     "r.yaml")
    with pytest.raises(RecipeError, match="defaults.calib_samples: expected an integer"):
        parse_recipe({"source": "x", "defaults": {"calib_samples": True},
                      "jobs": [{"method": "gptq"}]}, "r.yaml")


def test_messages_spell_options_as_the_flags():
    names = flag_names()
    assert names["damp_percent"] == "--damp"
    assert names["static_groups"] == "--static-groups/--dynamic-groups"
    assert names["act_order"] == "--act-order"
    assert names["exhaustive"] == "--exhaustive-search"
    with pytest.raises(ConfigError, match="takes no --exhaustive-search option"):
        get_method("gptq").check_options({"exhaustive": True}, names.get)


def test_a_field_without_a_declaration_is_refused():
    @dataclass(frozen=True)
    class Bare(MethodOptions):
        window: int = 3

    with pytest.raises(ConfigError, match="give it a help line"):
        option_fields(Bare)


def test_a_new_option_is_one_field(monkeypatch):
    """A method with a new options field gets its flag, help and recipe key with no other
    edit."""
    @dataclass(frozen=True)
    class ToyOptions(MethodOptions):
        rounds: int = option(2, help="Refinement rounds.")
        fast: bool = option(False, switch=True, help="Skip the refinement.")

    class Toy(Method):
        name = "toy"
        options_cls = ToyOptions

    monkeypatch.setitem(registry._METHODS, "toy", Toy)
    method_flags.cache_clear()
    flag_names.cache_clear()
    try:
        params = method_params()
        assert params["rounds"].opts == ["--rounds"]
        assert params["rounds"].help == "toy: refinement rounds (default 2)."
        assert params["fast"].is_flag and params["fast"].opts == ["--fast"]
        assert "rounds" in _option_names()
        assert _parse(["--rounds", "5", "--fast"]) == {"rounds": 5, "fast": True}
        assert make_config("toy", rounds=5).options == ToyOptions(rounds=5)
    finally:
        monkeypatch.undo()
        method_flags.cache_clear()
        flag_names.cache_clear()
    assert "rounds" not in method_params()


def test_one_option_declared_two_ways_is_refused(monkeypatch):
    @dataclass(frozen=True)
    class Clash(MethodOptions):
        threshold: float = option(1.0, flag="--cutoff", help="Another threshold.")

    class ClashMethod(Method):
        name = "clash"
        options_cls = Clash

    monkeypatch.setitem(registry._METHODS, "clash",
                        ClashMethod)
    method_flags.cache_clear()
    try:
        with pytest.raises(ConfigError, match="'threshold' is declared differently"):
            cli_options.method_flags()
    finally:
        monkeypatch.undo()
        method_flags.cache_clear()


@pytest.mark.parametrize("option,flag", [("calib_samples", "--calib-samples"),
                                         ("calib_seed", "--seed")])
def test_imatrix_file_names_the_calibration_flag_to_drop(option, flag):
    config = make_config("imatrix", gguf_type="Q4_K_M", imatrix_file="x.gguf", **{option: 5})
    with pytest.raises(ConfigError, match=f"replaces calibration; drop {flag}$"):
        get_method("imatrix").check(config)
