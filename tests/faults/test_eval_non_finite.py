"""Non-finite values never pass as results, and no JSON quantbench writes holds a bare NaN.

The evaluator's NaN comes in practice from a candidate whose dequantized weights hold NaN/Inf:
a forged artifact with a NaN or infinite scale, built here by editing a written artifact's scale
and rewriting its manifest's hashes, so verification passes and the evaluator's own check is
what catches it. Every format that stores scales is covered, and NaN, +Inf and -Inf.
"""
from __future__ import annotations

import ast
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.faults.conftest import assert_refused

EVAL = ("--ctx", "64", "--max-tokens", "64", "--no-cache")
FORMATS = {"gptq": ["-f", "gptq", "-g", "32"],
           "compressed-tensors": ["-f", "compressed-tensors", "-g", "32"],
           "gguf": ["--type", "Q8_0"]}
SCALE = {"gptq": "model.layers.1.mlp.down_proj.scales",
         "compressed-tensors": "model.layers.1.mlp.down_proj.weight_scale",
         "gguf": "blk.1.ffn_down.weight"}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def artifacts(_pristine_llama, tmp_path_factory) -> Path:
    from quantbench.cli import main

    root = tmp_path_factory.mktemp("non-finite")
    for name, args in FORMATS.items():
        main(["convert", str(_pristine_llama), "-o", str(root / name), *args])
    return root


def rehash(art: Path) -> None:
    """Record the files' current sizes and hashes, as a forger (or a buggy writer) would."""
    from quantbench.formats.manifest import file_table

    manifest = json.loads((art / "quantbench.json").read_text())
    manifest["files"] = file_table(art)
    (art / "quantbench.json").write_text(json.dumps(manifest, indent=2))


def forge_scale(art: Path, fmt: str, value: float) -> None:
    """One scale of blk.1's down projection set to ``value``; the manifest rewritten to match."""
    if fmt == "gguf":
        import gguf

        tensor = next(t for t in gguf.GGUFReader(str(art / "model.gguf")).tensors
                      if t.name == SCALE[fmt])
        with open(art / "model.gguf", "r+b") as fh:  # Q8_0 block: fp16 scale, then 32 codes
            fh.seek(int(tensor.data_offset))
            fh.write(np.float16(value).tobytes())
    else:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(art / "model.safetensors"))
        scales = tensors[SCALE[fmt]].clone()
        scales.view(-1)[0] = value
        tensors[SCALE[fmt]] = scales
        save_file(tensors, str(art / "model.safetensors"), {"format": "pt"})
    rehash(art)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_non_finite_scale_is_an_error_naming_the_model_and_window(qb, artifacts, tmp_path,
                                                                   fmt, value):
    art = Path(shutil.copytree(artifacts / fmt, tmp_path / f"forged-{fmt}"))
    forge_scale(art, fmt, value)
    # the files match their (forged) manifest: what refuses it is the non-finite value itself,
    # found where the tensor is read (inspect, eval) or in the evaluator's windows
    assert "quantbench.json" not in qb("inspect", art).stderr
    result = qb("eval", art, *EVAL, "--json", tmp_path / "report.json")
    assert result.code == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.lines if line.startswith("error:")]
    assert errors == [result.lines[-1]], result.stderr  # one error line, after the progress bar
    line = errors[0]
    assert f"forged-{fmt}" in line
    assert "window 0 (tokens 0–63 of WikiText-2 test)" in line or "down_proj" in line
    assert "NaN" in line or "Inf" in line or "infinite" in line or "overflows" in line
    assert "internal error" not in line and ("re-convert" in line or "re-create" in line)
    assert json.loads((art / "quantbench.json").read_text())["eval"] is None
    assert not (tmp_path / "report.json").exists()


# -- the evaluator and its metrics, directly -------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(_pristine_llama):
    from quantbench.models.loader import load_model

    model = load_model(_pristine_llama)
    return model, model.tokenizer()


def _spoiled(model, window: int, how: str):
    """A factory whose logits are the model's, spoiled on ``window`` (calls count windows)."""
    from quantbench.eval.run import source_factory

    def build():
        fn, calls = source_factory(model)(), [0]

        def logits(ids):
            out = fn(ids)
            calls[0] += 1
            if calls[0] - 1 == window:
                out = out.clone()
                if how == "nan":
                    out[0, 5, 7] = math.nan
                elif how == "inf":
                    out[0, 9, 3] = math.inf
                elif how == "-inf":  # the log-probability of every target becomes -inf
                    out[:] = -math.inf
                else:  # finite, but a perplexity no float can hold
                    out = out * 1e30
            return out
        return logits
    return build


PROTOCOL = dict(ctx=64, max_tokens=256)  # four windows of 64 tokens (no BOS on this tokenizer)


@pytest.mark.parametrize("how,what", [("nan", "NaN log-probabilities"),
                                      ("inf", "NaN log-probabilities"),
                                      ("-inf", "NaN log-probabilities"),
                                      ("huge", "a perplexity that overflows")])
def test_a_non_finite_baseline_is_an_error_naming_the_first_window(tiny, how, what):
    from quantbench.errors import EvalError
    from quantbench.eval.evaluator import evaluate
    from quantbench.eval.protocol import EvalProtocol
    from quantbench.eval.run import source_factory

    model, tok = tiny
    for candidates in ({}, {"q": source_factory(model)}):
        with pytest.raises(EvalError) as info:
            evaluate(_spoiled(model, 2, how), candidates, tok, EvalProtocol(**PROTOCOL), "k",
                     baseline_name="src", progress=False)
        message = str(info.value)
        assert message.startswith(f"baseline src: {what} in window 2 (tokens 128–191 of ")
        assert "\n" not in message


def test_a_non_finite_candidate_is_its_error_and_the_others_still_get_results(tiny, tmp_path):
    from quantbench.eval.evaluator import evaluate
    from quantbench.eval.protocol import EvalProtocol
    from quantbench.eval.run import source_factory
    from quantbench.jsonfile import dumps

    model, tok = tiny
    report = evaluate(source_factory(model), {"good": source_factory(model),
                                              "nan": _spoiled(model, 1, "nan"),
                                              "huge": _spoiled(model, 3, "huge")},
                      tok, EvalProtocol(**PROTOCOL), "k", cache_dir=tmp_path, progress=False)
    assert set(report.results) == {"good"} and report.results["good"].top1 == 1.0
    assert report.errors["nan"].startswith("nan: NaN log-probabilities in window 1 (tokens 64–127")
    assert report.errors["huge"].startswith("huge: a perplexity that overflows in window 3")
    assert math.isfinite(report.baseline.ppl) and report.baseline.n_tokens == 4 * 63
    data = json.loads(dumps(report.to_dict()))  # strict: no NaN anywhere
    assert set(data["errors"]) == {"nan", "huge"}


def _scripted(target_logit: float):
    """Logits 0 everywhere but ``target_logit`` on each next token: NLL ≈ log V − that logit."""
    def build():
        def logits(ids):
            out = torch.zeros(*ids.shape, 320)
            nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
            out.scatter_(2, nxt.unsqueeze(-1), target_logit)
            return out
        return logits
    return build


def test_results_that_overflow_over_finite_windows_are_an_error(tiny):
    from quantbench.eval.evaluator import evaluate
    from quantbench.eval.protocol import EvalProtocol

    _, tok = tiny  # a sure baseline (ppl ≈ 1) and a candidate at ppl ≈ 1e307: Δppl % is inf
    report = evaluate(_scripted(100.0), {"far": _scripted(-(707.5 - math.log(319)))}, tok,
                      EvalProtocol(**PROTOCOL), "k", progress=False)
    assert report.results == {} and math.isfinite(report.baseline.ppl)
    assert report.errors["far"].startswith("far: its delta_ppl_pct overflows (inf)")


def test_top1_over_non_finite_logits_is_not_agreement():
    from quantbench.eval.metrics import score_window

    torch.manual_seed(0)
    base = torch.randn(1, 6, 11)
    ids = torch.randint(0, 11, (1, 6))
    same = score_window(base, base.clone(), ids, 0)
    assert bool(same.top1.all())
    for spoil in (math.nan, math.inf):
        both = base.clone()
        both[0, 2, 4] = spoil  # the same position spoiled in both: argmax agrees, the values don't
        stats = score_window(both, both.clone(), ids, 0)
        assert stats.top1.tolist() == [True, True, False, True, True]


@pytest.mark.parametrize("damage", ["nan ppl", "inf ppl", "nan values", "not json"])
def test_a_cached_baseline_with_non_finite_values_is_discarded(tiny, tmp_path, damage):
    from quantbench.eval.evaluator import evaluate
    from quantbench.eval.protocol import EvalProtocol
    from quantbench.eval.run import source_factory
    from quantbench.jsonfile import loads_strict

    model, tok = tiny
    protocol = EvalProtocol(**PROTOCOL)
    first = evaluate(source_factory(model), {}, tok, protocol, "k", cache_dir=tmp_path,
                     progress=False)
    summary = next(tmp_path.glob("*.json"))
    values = summary.with_suffix(".npy")
    if damage == "nan values":
        np.save(values, np.full(4 * 63, np.nan, dtype=np.float32))
    elif damage == "not json":
        summary.write_text("{")
    else:  # as an older quantbench wrote it: a bare NaN/Infinity
        summary.write_text(summary.read_text().replace(
            json.dumps(first.baseline.ppl), "NaN" if damage == "nan ppl" else "Infinity"))
    again = evaluate(source_factory(model), {}, tok, protocol, "k", cache_dir=tmp_path,
                     progress=False)
    assert not again.baseline.cached and again.baseline.ppl == first.baseline.ppl
    assert loads_strict(summary.read_text())["ppl"] == first.baseline.ppl  # rewritten, valid


# -- compare and recipes: a NaN candidate is that row's / job's error ----------------------------

def _forging(monkeypatch, module: str, victim: str, fmt: str) -> None:
    import importlib

    mod = importlib.import_module(module)
    real = mod.write_artifact

    def write(qmodel, out, *args, **kwargs):
        path = real(qmodel, out, *args, **kwargs)
        if Path(out).name == victim:
            forge_scale(Path(out), fmt, math.nan)
        return path
    monkeypatch.setattr(mod, "write_artifact", write)


def test_compare_row_with_nan_results_is_its_error(qb, _pristine_llama, tmp_path, monkeypatch):
    from quantbench.jsonfile import loads_strict

    _forging(monkeypatch, "quantbench.eval.compare", "zeropoint-w4-g32", "gptq")
    out = tmp_path / "c.json"
    result = qb("compare", _pristine_llama, "--method", "zeropoint", "--bits", "8,4", "-g", "32",
                "--format", "gptq", *EVAL, "--json", out, "--plot", "")
    assert result.code == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.lines[-1].startswith("error: 1 of 2 rows have no result: zeropoint-w4-g32: ")
    assert "non-finite" in result.lines[-1] or "NaN log-probabilities" in result.lines[-1]
    data = loads_strict(out.read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["zeropoint-w8-g32"]["ppl"] > 1 and rows["zeropoint-w4-g32"]["ppl"] is None
    assert list(data["errors"]) == ["zeropoint-w4-g32"]


def test_recipe_job_with_nan_results_is_its_error(qb, _pristine_llama, tmp_path, monkeypatch):
    from quantbench.jsonfile import loads_strict

    _forging(monkeypatch, "quantbench.recipes.run", "bad", "compressed-tensors")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
source: {_pristine_llama}
output_dir: {tmp_path / "out"}
eval: {{ctx: 64, max_tokens: 64, cache: false}}
gate: {{max_kld: 1.0}}
jobs:
  - {{method: zeropoint, bits: 8, group_size: 32, format: compressed-tensors, name: good}}
  - {{method: zeropoint, bits: 4, group_size: 32, format: compressed-tensors, name: bad}}
""")
    result = qb("run", recipe)
    assert result.code == 1 and result.lines[-1].startswith("error: 1 of 2 jobs failed: bad")
    report = loads_strict((tmp_path / "out" / "recipe-report.json").read_text())
    jobs = {j["name"]: j for j in report["jobs"]}
    assert jobs["good"]["status"] == "passed" and jobs["good"]["kld_mean"] < 1
    assert jobs["bad"]["status"] == "error" and jobs["bad"]["ppl"] is None
    assert jobs["bad"]["error"].startswith("evaluate: bad: ")
    assert "non-finite" in jobs["bad"]["error"] or "NaN log-probabilities" in jobs["bad"]["error"]
    assert json.loads((tmp_path / "out" / "bad" / "quantbench.json").read_text())["eval"] is None


@pytest.mark.parametrize("bound", [".nan", ".inf", "-.inf"])
def test_a_recipe_gate_that_is_not_a_finite_number_is_refused(qb, _pristine_llama, tmp_path,
                                                             bound):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"source: {_pristine_llama}\ngate: {{max_kld: {bound}}}\n"
                      "jobs: [{method: zeropoint, bits: 8}]\n")
    assert_refused(qb("run", recipe), "gate.max_kld", "finite")


# -- JSON: one strict writer --------------------------------------------------------------------

def _json_writes(tree: ast.AST) -> list[int]:
    """Lines that call ``json.dump``/``json.dumps`` (or import them from json)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("dump", "dumps") and isinstance(node.func.value, ast.Name) \
                and node.func.value.id == "json":
            lines.append(node.lineno)
        if isinstance(node, ast.ImportFrom) and node.module == "json" and \
                {a.name for a in node.names} & {"dump", "dumps", "JSONEncoder"}:
            lines.append(node.lineno)
        if isinstance(node, ast.keyword) and node.arg == "allow_nan":
            lines.append(node.lineno)
    return lines


def test_every_json_write_goes_through_the_strict_writer():
    bypass = {}
    for path in sorted((ROOT / "quantbench").rglob("*.py")):
        if path.name == "jsonfile.py" and path.parent.name == "quantbench":
            continue
        lines = _json_writes(ast.parse(path.read_text(), str(path)))
        if lines:
            bypass[str(path.relative_to(ROOT))] = lines
    assert not bypass, f"JSON written around quantbench.jsonfile.dumps: {bypass}"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_the_writer_refuses_non_finite_naming_where_and_leaves_nothing(tmp_path, value):
    from quantbench.formats.manifest import write_json_atomic
    from quantbench.jsonfile import NonFiniteJSON, with_nulls

    target = tmp_path / "out" / "report.json"
    payload = {"results": {"w4": {"ppl": value}}, "rows": [1.0, value]}
    with pytest.raises(NonFiniteJSON, match=r"report\.json: .* at results\.w4\.ppl"):
        write_json_atomic(target, payload)
    assert not target.exists() and list(target.parent.glob("*")) == []
    write_json_atomic(target, with_nulls(payload, "report"))  # where missing is legitimate
    assert json.loads(target.read_text()) == {"results": {"w4": {"ppl": None}},
                                              "rows": [1.0, None]}


def test_an_unfinished_exl2_measurement_is_valid_json(tmp_path):
    from quantbench.jsonfile import loads_strict
    from quantbench.quant.exl2.measure import Candidate, Measurement, Slot

    m = Measurement({"digest": "d"}, {}, slots=[Slot(0, "mlp", 10, [
        Candidate({"w": "4"}, 40, 0.5), Candidate({"w": "8"}, 80)])])  # not measured yet: NaN
    m.save(tmp_path / "m.json")
    data = loads_strict((tmp_path / "m.json").read_text())
    assert [c["error"] for c in data["slots"][0]["candidates"]] == [0.5, None]
    back = Measurement.load(tmp_path / "m.json")
    assert back.slots[0].candidates[0].error == 0.5
    assert math.isnan(back.slots[0].candidates[1].error)


def test_a_statistic_without_a_value_is_stored_as_null(tmp_path, caplog):
    from quantbench.config import IntGridConfig
    from quantbench.formats.io import _qt_info
    from quantbench.quant.store import BlockStore

    grid = IntGridConfig(bits=4, group_size=8, symmetric=True)
    qt = grid.rtn(torch.randn(4, 16))
    qt.meta.update({"act_absmax_max": math.inf, "gptq_damp": 0.01})  # an fp16 overflow
    store = BlockStore(tmp_path / "store")
    store.add("block 0", {"x.weight": qt})
    label, tensors = next(iter(store))
    assert tensors["x.weight"].meta == {"act_absmax_max": None, "gptq_damp": 0.01}
    assert "act_absmax_max (inf)" in caplog.text and "written as null" in caplog.text
    assert _qt_info(qt)["stats"] == {"act_absmax_max": None, "gptq_damp": 0.01}


def test_a_source_config_with_a_bare_nan_is_refused_naming_the_key(qb, fresh_llama, tmp_path):
    from tests.faults.conftest import assert_no_leftovers

    src = fresh_llama()
    text = (src / "config.json").read_text()
    (src / "config.json").write_text(text.replace('"model_type"', '"custom_scale": NaN,\n  '
                                                                  '"model_type"', 1))
    out = tmp_path / "outs" / "o"
    assert_refused(qb("convert", src, "-o", out, "-g", "32"), "custom_scale", "config.json")
    assert_no_leftovers(out.parent)
