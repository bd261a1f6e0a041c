"""The exl2 method on the tiny model: measurement → allocation → GPTQ, the measurement's
reuse and resumption, and the refusals (impossible targets, another model's measurement)."""
import json
import os
import subprocess
import sys

import pytest

import quantbench.quant.exl2.measure as measure_mod
from quantbench.api import quantize, save
from quantbench.config import EXL2GridConfig
from quantbench.errors import ConfigError
from quantbench.formats.io import open_artifact
from quantbench.models.loader import load_model
from quantbench.quant.exl2.measure import Measurement
from tests.conftest import make_tiny_llama

CALIB = {"calib_samples": 4, "calib_len": 32, "batch_size": 2, "measure_samples": 4}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def model(tiny_llama):
    return load_model(tiny_llama)


def _convert(model, out, bpw, **kwargs):
    return save(quantize(model, method="exl2", bpw=bpw, **CALIB, **kwargs), out, format="exl2")


def test_bpw_target_measures_allocates_and_reuses(model, tmp_path, monkeypatch):
    out = _convert(model, tmp_path / "a", 4.6)
    strategy = json.loads((out / "exl2_strategy.json").read_text())
    manifest = json.loads((out / "quantbench.json").read_text())
    assert strategy["target_bpw"] == 4.6 and strategy["achieved_bpw"] <= 4.6
    assert manifest["summary"]["bits_per_weight_quantized"] == round(strategy["achieved_bpw"], 4)
    assert strategy["predicted_error"] > 0
    art = open_artifact(out)
    grids = {n: art.quantized(n).grid for n in art.quantized_names}
    assert {n: g.desc for n, g in grids.items()} == strategy["settings"]
    assert len({g.desc for g in grids.values()}) > 1          # a mix, not one width
    measurement = Measurement.load(out / "exl2_measurement.json")
    assert measurement.complete and len(measurement.slots) == 4   # 2 blocks × attn, mlp
    assert Measurement.load(strategy["measurement"]).to_dict() == measurement.to_dict()

    def no_measuring(*args, **kwargs):
        raise AssertionError("a complete measurement must be reused")

    monkeypatch.setattr(measure_mod, "measure", no_measuring)
    low = _convert(model, tmp_path / "b", 3.8)                 # same cache entry
    s_low = json.loads((low / "exl2_strategy.json").read_text())
    assert s_low["achieved_bpw"] <= 3.8 and s_low["predicted_error"] > strategy["predicted_error"]
    again = _convert(model, tmp_path / "c", 3.8,              # an explicit file, elsewhere
                     measurement=str(out / "exl2_measurement.json"))
    assert json.loads((again / "exl2_strategy.json").read_text())["settings"] == s_low["settings"]


def test_interrupted_measurement_resumes(model, tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    real_save = Measurement.save

    def interrupt(self, p):
        real_save(self, p)
        if not self.complete:
            raise KeyboardInterrupt            # after block 0 is on disk

    monkeypatch.setattr(Measurement, "save", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _convert(model, tmp_path / "a", 4.6, measurement=str(path))
    assert not (tmp_path / "a").exists()
    partial = Measurement.load(path)
    assert not partial.complete and partial.measured_blocks() == {0}
    monkeypatch.setattr(Measurement, "save", real_save)
    measured = []
    branch = measure_mod._measure_branch
    monkeypatch.setattr(measure_mod, "_measure_branch",
                        lambda m, layer, index, *a: (measured.append(index),
                                                     branch(m, layer, index, *a))[1])
    _convert(model, tmp_path / "b", 4.6, measurement=str(path))
    assert set(measured) == {1}
    resumed = Measurement.load(path)
    _convert(model, tmp_path / "c", 4.6, measurement=str(tmp_path / "fresh.json"))
    fresh = Measurement.load(tmp_path / "fresh.json")
    assert resumed.complete and [c.error for s in resumed.slots for c in s.candidates] == \
        pytest.approx([c.error for s in fresh.slots for c in s.candidates], rel=1e-5)


def test_measurement_of_another_model_is_refused(model, tmp_path):
    _convert(model, tmp_path / "a", 4.6, measurement=str(tmp_path / "m.json"))
    other = load_model(make_tiny_llama(tmp_path / "other", seed=1, tokenizer=False))
    with pytest.raises(ConfigError, match="measures another model"):
        quantize(other, method="exl2", bpw=4.6, measurement=str(tmp_path / "m.json"), **CALIB)
    (tmp_path / "junk.json").write_text('{"kind": "something else"}')
    with pytest.raises(Exception, match="not a quantbench EXL2 measurement"):
        quantize(model, method="exl2", bpw=4.6, measurement=str(tmp_path / "junk.json"))
    old = json.loads((tmp_path / "m.json").read_text())
    (tmp_path / "v1.json").write_text(json.dumps({**old, "version": 1}))
    with pytest.raises(Exception, match="measured the old way"):  # per-window errors
        quantize(model, method="exl2", bpw=4.6, measurement=str(tmp_path / "v1.json"))


@pytest.mark.parametrize("bpw,needle", [(2.5, "below the cheapest"), (12.0, "above the dearest")])
def test_impossible_targets_are_refused_before_any_work(model, monkeypatch, bpw, needle):
    monkeypatch.setattr(measure_mod, "measure", None)       # nothing may be measured
    with pytest.raises(ConfigError, match=needle):
        quantize(model, method="exl2", bpw=bpw, **CALIB)


@pytest.mark.parametrize("kwargs,needle", [
    ({"bpw": 4.0, "bits": 4}, "drop --bits"),
    ({"bits": 4, "symmetric": False}, "symmetric"),
    ({"bits": 4, "measurement": "m.json"}, "add --bpw"),
    ({"bits": 7}, "EXL2 width"),
    ({"bits": 4, "group_size": 16}, "a multiple of 32"),
])
def test_bad_options(model, kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        quantize(model, method="exl2", **kwargs)


def test_one_width_without_bpw(model):
    q = quantize(model, method="exl2", bits=3, group_size=64)
    assert q.config.grid == EXL2GridConfig((3,), (1.0,), (64,))


def test_cli_bpw_then_reuse(tiny_llama, tmp_path):
    env = {**os.environ, "COLUMNS": "200", "QUANTBENCH_CACHE": str(tmp_path / "cache")}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "quantbench.cli", *map(str, args)],
                              capture_output=True, text=True, env=env, timeout=600)

    flags = ["--calib-samples", "4", "--calib-len", "32", "--measure-samples", "4"]
    proc = run("convert", tiny_llama, "-m", "exl2", "--bpw", "4.6", *flags, "-o", tmp_path / "a",
               "--measurement", tmp_path / "m.json")
    assert proc.returncode == 0, proc.stderr
    assert "EXL2 allocation" in proc.stdout and "(exl2," in proc.stdout
    proc = run("convert", tiny_llama, "-m", "exl2", "--bpw", "2", *flags, "-o", tmp_path / "b",
               "--measurement", tmp_path / "m.json")
    assert proc.returncode == 2 and "below the cheapest" in proc.stderr
    assert not (tmp_path / "b").exists()


def test_plan_counts_the_measurement_only_when_it_is_still_to_do(model, tmp_path):
    from quantbench.calibration.plan import estimate

    from quantbench.quant.run import make_config, quantize as checked

    def plan(**kwargs):  # checked and prepared, not run (what `convert --plan` does)
        q = checked(model, make_config("exl2", bpw=4.6, **CALIB, **kwargs))
        return estimate(model, q.config, gflops=10.0, method=q.method)

    fresh = plan(measurement=str(tmp_path / "m.json"))
    assert {"measurement forwards", "measurement solves"} <= set(fresh.parts)
    one_width = checked(model, make_config("exl2", 4, 32, **CALIB))
    uniform = estimate(model, one_width.config, gflops=10.0, method=one_width.method)
    assert "measurement solves" not in uniform.parts and "solves" in uniform.parts
    assert fresh.seconds > 3 * uniform.seconds      # 11 rungs per linear, 21 candidates
    _convert(model, tmp_path / "a", 4.6, measurement=str(tmp_path / "m.json"))
    reused = plan(measurement=str(tmp_path / "m.json"))
    assert not any(k.startswith("measurement") for k in reused.parts)
    assert reused.seconds == pytest.approx(uniform.seconds, rel=0.01)
