"""Class 8: every numeric option's refusal states the range that is really accepted.

The ranges are declared once (``quantbench/ranges.py`` ``Range``, on the option fields, the
grids, the evaluation protocol and the recipe gate). This suite walks every numeric method
option of every registered method, the grid settings (``--bits``, ``--group-size``) of every
method, the evaluation options and the recipe gate: a value just outside is refused before any
work with a message that names the option and states the declared range, through the CLI, a
recipe and the Python API; the boundary values themselves are accepted.
"""
from __future__ import annotations

import dataclasses
import math

import pytest

from quantbench.errors import ConfigError
from quantbench.options import cli_flag, field_type, option_fields, option_label, option_spec
from quantbench.ranges import Range
from quantbench.registry import get_method, method_names
from tests.faults.conftest import assert_no_leftovers, assert_refused


# -- what a Range says is inside and outside (computed from its fields, not from its code) --

def edges(r: Range) -> list[float]:
    """The extreme allowed values: closed bounds, the first values past open ones, the
    special values, the ends of a list."""
    if r.values:
        return [min(r.values), max(r.values), *(v for v, _ in r.also)]
    step = 1 if r.integer else 1e-6
    out = [v for v, _ in r.also]
    if r.low is not None:
        low = r.low + step if r.low_open else r.low
        if r.multiple_of:
            low = math.ceil(low / r.multiple_of) * r.multiple_of
        out.append(int(low) if r.integer else low)
    if r.high is not None:
        out.append(int(r.high - step) if r.high_open and r.integer else
                   r.high - step if r.high_open else r.high)
    if r.low is None and r.high is None:
        out += [0, -1, 10**6]
    return out


def outside(r: Range) -> list[float]:
    """Values just past every bound (and between listed values), never a special value."""
    special = {v for v, _ in r.also}
    if r.values:
        near = {v + d for v in r.values for d in (-1, 1)}
        return sorted(v for v in near if v not in set(r.values) | special)[:3]
    step = 1 if r.integer else 1e-3
    out = []
    if r.low is not None:
        v = r.low if r.low_open else r.low - step
        while v in special:
            v -= step
        out.append(v)
    if r.high is not None:
        out.append(r.high if r.high_open else r.high + step)
    if r.multiple_of and r.low is not None:
        out.append(r.low + r.multiple_of // 2)
    out = [int(v) if r.integer else v for v in out]
    return out + ([1.5] if r.integer else [float("nan")])


def numeric_options():
    """(method, options class, field, its Range) for every numeric option of every method."""
    found = []
    for method in method_names():
        cls = get_method(method).options_cls
        for f in option_fields(cls):
            kind, _ = field_type(f)
            if kind in (int, float):
                found.append((method, cls, f, option_spec(cls, f).allowed))
    return found


NUMERIC = numeric_options()
IDS = [f"{m}-{f.name}" for m, _, f, _ in NUMERIC]


def _base_kwargs(method: str) -> dict:
    """What ``make_config`` needs beside the option for the method to build at all."""
    return {"group_size": 32} if method not in ("nf4", "fp4", "llm_int8", "exl2") else {}


def test_every_numeric_option_declares_its_range():
    missing = [f"{m}.{f.name}" for m, _, f, allowed in NUMERIC if allowed is None]
    assert not missing, f"numeric options without allowed=Range(...): {missing}"
    assert len({(m, f.name) for m, _, f, _ in NUMERIC}) >= 15  # the walk found them all


@pytest.mark.parametrize("method,cls,field,allowed", NUMERIC, ids=IDS)
def test_out_of_range_is_refused_with_the_range(method, cls, field, allowed):
    from quantbench.quant.run import make_config

    label = option_label(cls, field)
    for value in outside(allowed):
        with pytest.raises(ConfigError) as info:
            make_config(method, **_base_kwargs(method), **{field.name: value})
        message = str(info.value)
        assert label in message and allowed.text() in message, message
        assert "\n" not in message


@pytest.mark.parametrize("method,cls,field,allowed", NUMERIC, ids=IDS)
def test_boundaries_are_accepted(method, cls, field, allowed):
    from quantbench.quant.run import make_config

    for value in edges(allowed):
        config = make_config(method, **_base_kwargs(method), **{field.name: value})
        assert getattr(config.options, field.name) == value


# on the command line click parses the type; the range is ours (an unbounded integer has none)
FLAGGED = [(m, c, f, a) for m, c, f, a in NUMERIC
           if cli_flag(c, f) is not None and (a.low is not None or a.high is not None)]


@pytest.mark.parametrize("method,cls,field,allowed", FLAGGED,
                         ids=[f"{m}-{f.name}" for m, _, f, _ in FLAGGED])
def test_cli_refuses_before_any_work(qb, fresh_llama, tmp_path, method, cls, field, allowed):
    src = fresh_llama()
    value = outside(allowed)[0]
    extra = ["--bpw", "4"] if method == "exl2" and field.name != "bpw" else []
    out = tmp_path / "out"
    line = assert_refused(qb("convert", src, "-m", method, "-o", out, *extra,
                             cli_flag(cls, field), value), allowed.text())
    assert cli_flag(cls, field) in line
    assert_no_leftovers(tmp_path, keep=(src.name,))


@pytest.mark.parametrize("method,cls,field,allowed", NUMERIC, ids=IDS)
def test_recipe_refuses_with_the_range(method, cls, field, allowed):
    from quantbench.recipes import Recipe
    from quantbench.recipes.parts import RecipeError

    job = {"method": method, field.name: outside(allowed)[0], **_base_kwargs(method)}
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict({"source": "nowhere", "jobs": [job]}, origin="r.yaml")
    assert "r.yaml: jobs[0]" in str(info.value) and allowed.text() in str(info.value)


def test_api_refuses_before_loading_anything():
    import quantbench as qb

    with pytest.raises(ConfigError, match=r"--damp \(damp_percent\) must be a number > 0 and "
                                          r"< 1, got 2"):
        qb.quantize("no/such-model-is-loaded", method="gptq", damp_percent=2)
    with pytest.raises(ConfigError, match="must be an integer >= 1, got '4'"):
        qb.quantize("no/such-model-is-loaded", method="gptq", calib_samples="4")


def test_an_inner_methods_option_is_checked_too():
    from quantbench.quant.run import make_config

    with pytest.raises(ConfigError, match=r"--damp \(damp_percent\) must be a number > 0"):
        make_config("awq", group_size=32, then="gptq", damp_percent=0)
    assert make_config("awq", group_size=32, then="gptq", damp_percent=0.5)


# -- grid settings: --bits and --group-size of every method --------------------------------

def _grid_ranges():
    """method → (bits: Range or the one width it stores, group size: Range or the one it
    takes), from the grids' own declarations; a method missing here fails the walk."""
    from quantbench.quant.grids.codebook import BLOCK_SIZE
    from quantbench.quant.grids.exl2 import GROUP_ROWS, WIDTH
    from quantbench.quant.grids.int import GROUP_SIZE, INT_BITS

    integer = (INT_BITS, GROUP_SIZE)
    return {"absmax": integer, "zeropoint": integer, "rtn": integer, "imatrix": integer,
            "gptq": integer, "awq": integer, "nf4": (4, BLOCK_SIZE), "fp4": (4, BLOCK_SIZE),
            "llm_int8": (8, -1), "exl2": (WIDTH, GROUP_ROWS)}


def test_every_method_has_its_grid_ranges_walked():
    assert set(_grid_ranges()) == set(method_names())


GRID_CASES = [(m, key) for m in sorted(_grid_ranges()) for key in ("bits", "group_size")]


@pytest.mark.parametrize("method,key", GRID_CASES, ids=[f"{m}-{k}" for m, k in GRID_CASES])
def test_grid_settings_state_their_range(method, key):
    from quantbench.quant.run import make_config

    allowed = _grid_ranges()[method][0 if key == "bits" else 1]
    other = {"bits": None, "group_size": None}
    if isinstance(allowed, int):  # a method defined at one width / granularity
        make_config(method, **{**other, key: allowed})
        with pytest.raises(ConfigError, match=f"{allowed}"):
            make_config(method, **{**other, key: allowed + 1})
        return
    if key == "bits" and method in ("absmax", "zeropoint", "rtn", "imatrix", "gptq", "awq"):
        other["group_size"] = 32
    for value in edges(allowed):
        if key == "group_size" and value == 0 and method == "imatrix":
            continue  # imatrix takes 0 as "its default group" (128)
        make_config(method, **{**other, key: value})
    flag = "--bits" if key == "bits" else "--group-size"
    for value in outside(allowed):
        with pytest.raises(ConfigError) as info:
            make_config(method, **{**other, key: value})
        assert flag in str(info.value) and allowed.text() in str(info.value), str(info.value)


def test_group_size_above_the_row_length_names_the_row(qb, fresh_llama, tmp_path):
    src = fresh_llama()
    assert_refused(qb("convert", src, "-o", tmp_path / "o", "-g", 65), "group size <= 64")
    assert_refused(qb("convert", src, "-o", tmp_path / "o", "-g", -2),
                   "--group-size must be an integer >= 1, -1 (per output channel) or 0 (per "
                   "tensor), got -2")


def test_the_gptq_layout_names_the_widths_it_stores(qb, fresh_llama, tmp_path):
    src = fresh_llama()
    assert_refused(qb("convert", src, "-o", tmp_path / "o", "-g", 32, "-b", 5, "-f", "gptq"),
                   "2, 3, 4 or 8-bit")


def test_exl2_bpw_states_the_models_range(qb, fresh_llama, tmp_path):
    """Beyond 1 < bpw <= 16, the model's cheapest and dearest mixes bound it; both named."""
    src = fresh_llama()
    assert_refused(qb("convert", src, "-o", tmp_path / "o", "-m", "exl2", "--bpw", 1.5,
                      "--measurement", tmp_path / "m.json"), "below the cheapest", "or more")
    assert_refused(qb("convert", src, "-o", tmp_path / "o", "-m", "exl2", "--bpw", 17),
                   "--bpw must be a number > 1 and <= 16, got 17")


# -- evaluation options (eval, compare, recipes) -------------------------------------------

def _protocol_ranges():
    from quantbench.eval.protocol import BATCH_SIZE, CTX, WINDOWS, max_tokens_range

    return {"ctx": CTX, "n_windows": WINDOWS, "batch_size": BATCH_SIZE,
            "max_tokens": max_tokens_range(64)}


@pytest.mark.parametrize("key", ["ctx", "n_windows", "batch_size", "max_tokens"])
def test_protocol_boundaries_and_refusals(key):
    from quantbench.eval.protocol import EvalProtocol

    allowed = _protocol_ranges()[key]
    base = {"ctx": 64, "max_tokens": None}
    for value in edges(allowed):
        EvalProtocol(**{**base, key: value})
    for value in outside(allowed):
        with pytest.raises(ConfigError) as info:
            EvalProtocol(**{**base, key: value})
        assert allowed.text() in str(info.value), str(info.value)


@pytest.mark.parametrize("flag,value,needle", [
    ("--ctx", 7, "--ctx must be an integer >= 8, got 7"),
    ("--ctx", -1, "--ctx must be an integer >= 8, got -1"),
    ("--windows", 0, "--windows must be an integer >= 1, got 0"),
    ("--max-tokens", 63, "--max-tokens must be an integer >= 64 or 0 (the whole text), got 63"),
    ("--max-tokens", -5, "--max-tokens must be an integer >= 64 or 0 (the whole text)"),
])
@pytest.mark.parametrize("command", ["eval", "compare"])
def test_eval_and_compare_state_the_range(qb, fresh_llama, tmp_path, command, flag, value,
                                          needle):
    src = fresh_llama()
    args = ["--ctx", 64] if flag != "--ctx" else []
    extra = ["--json", tmp_path / "c.json", "--plot", tmp_path / "c.png"] \
        if command == "compare" else ["--no-cache"]
    assert_refused(qb(command, src, *args, flag, value, *extra), needle)
    assert_no_leftovers(tmp_path, keep=(src.name,))


def test_max_tokens_zero_means_the_whole_text_everywhere():
    from quantbench.eval.protocol import EvalProtocol

    assert EvalProtocol(ctx=64, max_tokens=0).max_tokens is None


@pytest.mark.parametrize("key,value,needle", [
    ("ctx", 4, "eval: --ctx must be an integer >= 8, got 4"),
    ("n_windows", 0, "--windows must be an integer >= 1, got 0"),
    ("batch_size", 0, "batch size must be an integer >= 1, got 0"),
])
def test_recipe_eval_states_the_range(key, value, needle):
    from quantbench.recipes import Recipe
    from quantbench.recipes.parts import RecipeError

    with pytest.raises(RecipeError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        Recipe.from_dict({"source": "x", "eval": {key: value},
                          "jobs": [{"method": "zeropoint", "group_size": 32}]}, origin="r.yaml")


@pytest.mark.parametrize("key", ["max_delta_ppl_pct", "max_kld", "min_top1"])
def test_recipe_gate_states_the_range(key):
    from quantbench.recipes import Gate, Recipe
    from quantbench.recipes.parts import GATE_RANGES, RecipeError

    allowed = GATE_RANGES[key]
    for value in edges(allowed):
        Gate(**{key: value})
    for value in outside(allowed):
        if isinstance(value, float) and math.isnan(value):
            continue  # YAML numbers: NaN is refused by the type check first
        with pytest.raises(RecipeError) as info:
            Recipe.from_dict({"source": "x", "gate": {key: value},
                              "jobs": [{"method": "zeropoint", "group_size": 32}]},
                             origin="r.yaml")
        assert f"gate: {key} must be {allowed.text()}" in str(info.value)


def test_min_top1_is_a_fraction():
    """90 (meant as percent) would fail every job: refused, with the range."""
    from quantbench.recipes import Gate

    with pytest.raises(ConfigError, match=r"min_top1 must be a number >= 0 and <= 1, got 90"):
        Gate(min_top1=90)


def test_range_text_and_check_agree():
    """The one object both checks and states: spot checks of the wording."""
    assert Range(1, integer=True).text() == "an integer >= 1"
    assert Range(0, 1, low_open=True, high_open=True).text() == "a number > 0 and < 1"
    assert Range(2, 8, integer=True).text() == "an integer from 2 to 8"
    assert Range(values=(32, 64)).text() == "one of 32, 64"
    assert Range(32, integer=True, multiple_of=32).text() == \
        "an integer >= 32 and a multiple of 32"
    r = Range(0, 1, low_open=True, high_open=True)
    for bad in (0, 1, float("nan"), float("inf"), True, "0.5", None):
        assert not r.contains(bad)
    assert r.contains(0.5) and Range(integer=True).contains(-7)
    assert not Range(1, integer=True).contains(1.0)
    assert dataclasses.is_dataclass(r)


@pytest.mark.parametrize("flag,value", [("-b", ""), ("-b", ","), ("-m", " , ")])
def test_compare_lists_that_are_empty_are_refused(qb, fresh_llama, tmp_path, flag, value):
    """An empty --bits/--method list compared nothing and still exited 0 with a report."""
    src = fresh_llama()
    assert_refused(qb("compare", src, flag, value, "--no-cache",
                      "--json", tmp_path / "c.json", "--plot", tmp_path / "c.png"),
                   "at least one value")
    assert not (tmp_path / "c.json").exists()
