"""Defaults that work on the model at hand: a default group size fitted to its rows (and
announced), an explicit one kept; a long calibrated run prints its plan before its first block.

The model is a tiny llama with 192-wide inputs (and 384-wide down_proj): 128 does not divide
192, 64 does — the sample's 576/1536 case in miniature."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from tests.conftest import make_tiny_llama
from tests.faults.conftest import _qb, assert_refused

CALIB = ("--calib-samples", "4", "--calib-len", "64")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("wide") / "llama", layers=1, hidden=192,
                           intermediate=384)


@pytest.fixture
def qb(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    return lambda *args: _qb(capsys, *args)


@pytest.mark.parametrize("widths, group", [
    ({576, 1536}, 64),      # SmolLM2-135M
    ({4096, 11008}, 128),   # Llama-2-7B: the default fits
    ({96, 192}, 32),
    ({48}, None),           # nothing from 128 down to 32 divides it: the default stays
    ({256}, 128),
])
def test_fitted_group_size(widths, group):
    from quantbench.quant.run import fitted_group_size

    assert fitted_group_size(128, widths) == group


def test_convert_fits_and_announces_the_default_group(qb, wide, tmp_path, caplog):
    out = tmp_path / "ct"
    with caplog.at_level(logging.WARNING):
        result = qb("convert", wide, "-f", "compressed-tensors", "-o", out)
    assert result.code == 0, result.stderr
    assert ("group size 64: 128 does not divide the 192-wide inputs of q_proj, k_proj, v_proj, "
            "o_proj, gate_proj, up_proj (pass --group-size to choose)") in caplog.text
    manifest = json.loads((out / "quantbench.json").read_text())
    assert manifest["quantize"]["grid"]["group_size"] == 64
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["config_groups"]["group_0"]["weights"]["group_size"] == 64


def test_explicit_group_that_does_not_fit_is_refused(qb, wide, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        result = qb("convert", wide, "-f", "compressed-tensors", "-g", "128", "-o",
                    tmp_path / "o")
    assert_refused(result, "divide every row", "--group-size 64")
    assert "group size 64:" not in caplog.text
    assert not (tmp_path / "o").exists()


class _Weights:
    def __init__(self, shapes):
        self.shapes = shapes

    def shape(self, name):
        return self.shapes[name]


class _Model:
    def __init__(self, shapes):
        self.weights = _Weights(shapes)


def test_fit_default_group_says_which_rows_and_is_silent_when_it_fits(caplog):
    from quantbench.quant.run import fit_default_group

    fits = _Model({"model.layers.0.mlp.up_proj.weight": (11008, 4096),
                   "model.layers.0.mlp.down_proj.weight": (4096, 11008)})
    with caplog.at_level(logging.WARNING):
        assert fit_default_group(fits, list(fits.weights.shapes), 128) == 128
    assert caplog.text == ""
    odd = _Model({"model.layers.0.self_attn.q_proj.weight": (576, 576),
                  "model.layers.0.mlp.down_proj.weight": (576, 1536),
                  "model.layers.1.self_attn.q_proj.weight": (576, 576)})
    with caplog.at_level(logging.WARNING):
        assert fit_default_group(odd, list(odd.weights.shapes), 128) == 64
    assert caplog.messages == ["group size 64: 128 does not divide the 576-wide inputs of "
                               "q_proj (pass --group-size to choose)"]
    nothing = _Model({"x.weight": (8, 48)})
    assert fit_default_group(nothing, ["x.weight"], 128) == 128  # the format's check decides


def test_python_api_fits_the_default(wide, caplog):
    import quantbench as qb_api

    with caplog.at_level(logging.WARNING):
        q = qb_api.quantize(str(wide), method="zeropoint", bits=4)
    assert q.config.grid.group_size == 64 and not q.config.group_size_open
    assert "group size 64" in caplog.text
    kept = qb_api.quantize(str(wide), method="zeropoint", bits=4, group_size=32)
    assert kept.config.grid.group_size == 32


def test_gptq_format_and_methods_with_their_own_block(wide):
    """The fit applies to integer group grids only: nf4's absmax block and per-channel
    LLM.int8 keep theirs; the config's JSON has no trace of the flag."""
    import quantbench as qb_api
    from quantbench.config import QuantizeConfig

    nf4 = qb_api.quantize(str(wide), method="nf4")
    assert nf4.config.grid.cli_group_size == 64
    q = qb_api.quantize(str(wide), method="absmax", bits=8)
    assert "group_size_open" not in json.dumps(q.config.to_dict())
    assert QuantizeConfig.from_dict(q.config.to_dict()) == q.config


def test_recipe_names_carry_the_fitted_group(wide, tmp_path):
    from quantbench.models.loader import load_model
    from quantbench.recipes import Recipe
    from quantbench.recipes.run import _group_fitter

    recipe = Recipe.from_dict({"source": str(wide), "output_dir": str(tmp_path / "r"),
                               "jobs": [{"method": "zeropoint", "bits": [4, 8]},
                                        {"method": "absmax", "bits": 4, "group_size": 32}]})
    assert [p.name for p in recipe.plan()] == ["zeropoint-w4-g128", "zeropoint-w8-g128",
                                              "absmax-w4-g32"]
    fitted = recipe.plan(_group_fitter({str(wide): load_model(wide)}))
    assert [p.name for p in fitted] == ["zeropoint-w4-g64", "zeropoint-w8-g64", "absmax-w4-g32"]
    assert fitted[0].config.grid.group_size == 64


def test_compare_fits_once(wide, tmp_path, caplog):
    from quantbench.eval.compare import run_compare

    with caplog.at_level(logging.WARNING):
        result = run_compare(str(wide), methods=["zeropoint"], bits=[4], use_cache=False,
                             ctx=64, max_tokens=64)
    assert caplog.text.count("group size 64:") == 1
    row = result.rows[1]
    assert row.name == "zeropoint-w4-g64" and row.group_size == 64
    assert row.bits_per_weight is not None and row.bits_per_weight_all is not None


def test_long_run_notice_has_the_plan_and_a_smaller_one(wide, monkeypatch):
    from quantbench.calibration import plan
    from quantbench.models.loader import load_model
    from quantbench.quant.run import make_config, quantize

    model = load_model(wide)
    q = quantize(model, make_config("gptq"))  # the default calibration: 128 × 512
    monkeypatch.setattr(plan, "LONG_RUN_SECONDS", 0)
    lines = plan.long_run_notice(model, q.config, q.method)
    assert len(lines) == 2
    assert "gptq int4 sym g64" in lines[0] and "(estimate)" in lines[0]
    assert "GiB" in lines[0] and "calibration 128 × 512 tokens" in lines[0]
    assert lines[1].startswith("to make it smaller: --calib-samples 32 --calib-len 256 (about ")
    data_free = quantize(model, make_config("zeropoint"))
    assert plan.long_run_notice(model, data_free.config, data_free.method) == []
    monkeypatch.setattr(plan, "LONG_RUN_SECONDS", 10**9)
    assert plan.long_run_notice(model, q.config, q.method) == []


def test_a_long_run_prints_its_plan_before_starting(qb, wide, tmp_path, caplog, monkeypatch):
    from quantbench.calibration import plan

    monkeypatch.setattr(plan, "LONG_RUN_SECONDS", 0)
    with caplog.at_level(logging.WARNING):
        result = qb("convert", wide, "-m", "gptq", *CALIB, "-o", tmp_path / "o")
    assert result.code == 0, result.stderr
    assert "calibration 4 × 64 tokens" in caplog.text
    assert "--plan prints the estimate without running" in caplog.text


def test_announcements_reach_stderr_of_the_real_cli(wide, tmp_path):
    """One real process: the announcement is on stderr, the artifact is written."""
    env = {**os.environ, "COLUMNS": "300"}
    proc = subprocess.run([sys.executable, "-m", "quantbench.cli", "convert", str(wide), "-f",
                           "compressed-tensors", "-o", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "group size 64: 128 does not divide the 192-wide inputs" in proc.stderr
