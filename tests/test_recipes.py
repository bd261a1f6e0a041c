"""Recipes: YAML parsing and validation, and ``quantbench run`` end to end on a tiny model
(gate verdicts, one baseline per source and protocol, uploads only for passing jobs)."""
from __future__ import annotations

import importlib
import inspect
import json
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantbench.cli import cli, main
from quantbench.recipes import Evaluation, Gate, Job, Recipe, RecipeError, Upload, run_recipe
from quantbench.eval.protocol import EvalProtocol

ROOT = Path(__file__).resolve().parents[1]

FULL = """
name: smollm2-4bit
source: sample:smollm2
output_dir: out/recipe
eval: {ctx: 256, max_tokens: 1024}
gate: {max_delta_ppl_pct: 5, max_kld: 0.05}
upload: {repo: "me/smollm2-{name}", private: true}
defaults: {group_size: 64, calib_samples: 8, calib_len: 128}
jobs:
  - methods: [gptq, awq]
    bits: 4
    formats: [gptq, compressed-tensors]
  - method: absmax
    bits: [8, 4]
    gate: {max_kld: 0.5}
    eval: {max_tokens: 512}
  - {method: nf4, format: bitsandbytes, double_quant: true, upload: false}
  - {method: rtn, type: Q4_K_M, name: q4km}
"""


def test_yaml_expands_and_merges():
    recipe = Recipe.from_yaml(FULL, origin="r.yaml")
    plan = {p.name: p for p in recipe.plan()}
    assert list(plan) == ["gptq-w4-g64", "gptq-w4-g64-compressed-tensors", "awq-w4-g64-gptq",
                          "awq-w4-g64-compressed-tensors", "absmax-w8-g64", "absmax-w4-g64",
                          "nf4-w4-g64-dq-bitsandbytes", "q4km"]
    gptq = plan["gptq-w4-g64"]
    assert gptq.config.options.calib_samples == 8 and gptq.config.options.calib_len == 128
    assert gptq.format == "gptq" and gptq.gate == Gate(5.0, 0.05)
    assert gptq.upload == Upload("me/smollm2-gptq-w4-g64", private=True)
    assert gptq.evaluation.protocol == EvalProtocol(ctx=256, max_tokens=1024)
    absmax = plan["absmax-w8-g64"]  # job gate and eval merged over the recipe's
    assert absmax.gate == Gate(5.0, 0.5) and absmax.evaluation.protocol.max_tokens == 512
    assert absmax.evaluation.protocol.ctx == 256 and absmax.config.options.to_dict() == {}
    assert plan["nf4-w4-g64-dq-bitsandbytes"].upload is None
    assert plan["nf4-w4-g64-dq-bitsandbytes"].config.options.double_quant is True
    assert plan["q4km"].format == "gguf" and plan["q4km"].gguf_type == "Q4_K_M"
    assert recipe.output_dir == Path("out/recipe") and recipe.name == "smollm2-4bit"


@pytest.mark.parametrize("name", ["recipe.yaml", "demo.yaml"])
def test_example_recipe_is_valid(name):
    recipe = Recipe.load(ROOT / "examples" / name)
    assert recipe.plan() and all(p.source == "sample:smollm2" for p in recipe.plan())


def test_demo_is_the_tour_the_readme_describes():
    """`make demo` runs examples/demo.yaml: RTN and GPTQ at 4 and 3 bits, NF4, GGUF Q4_K_M,
    scored on 2,048 tokens, with a plot (it is run in full by tests/test_readme.py)."""
    recipe = Recipe.load(ROOT / "examples" / "demo.yaml")
    assert [(p.config.method, p.format, p.gguf_type) for p in recipe.plan()] == [
        ("zeropoint", "compressed-tensors", None), ("zeropoint", "compressed-tensors", None),
        ("gptq", "compressed-tensors", None), ("gptq", "compressed-tensors", None),
        ("nf4", "bitsandbytes", None), ("rtn", "gguf", "Q4_K_M")]
    assert recipe.plot is not None and recipe.plan()[0].evaluation.protocol.max_tokens == 2048
    assert "quantbench run examples/demo.yaml" in (ROOT / "Makefile").read_text()


def test_readme_shows_the_example_recipe():
    import re

    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert (ROOT / "examples" / "recipe.yaml").read_text() in blocks
    assert "quantbench run examples/recipe.yaml" in (ROOT / "README.md").read_text()


def test_python_built_recipe():
    recipe = Recipe(jobs=[Job(methods="zeropoint", bits=[4, 3], group_size=32),
                          Job(methods="gptq", options={"calib_samples": 4})],
                    source="some/model", gate=Gate(max_kld=0.1),
                    evaluation=Evaluation(EvalProtocol(max_tokens=1024)))
    names = [p.name for p in recipe.plan()]
    assert names == ["zeropoint-w4-g32", "zeropoint-w3-g32", "gptq-w4-g128"]
    with pytest.raises(RecipeError, match="takes it"):
        Recipe(jobs=[Job(methods="absmax", options={"calib_samples": 4})], source="x")


BAD = [
    ("jobz: []", "unknown key 'jobz' (did you mean 'jobs'?); allowed: name, source"),
    ("source: x\njobs: [{method: absmax, bitz: 4}]",
     "jobs[0]: unknown key 'bitz' (did you mean 'bits'?); allowed: name, source, method"),
    ("source: x\njobs: [{method: absmax, calib_samples: 4}]",
     "jobs[0]: unknown key 'calib_samples'; no method of this job (absmax) takes it"),
    ("source: x\njobs: [{method: gtpq}]", "jobs[0].method: unknown method 'gtpq'; did you mean 'gptq'? choose one"),
    ("source: x\njobs: [{method: absmax, format: gguff}]", "jobs[0].format: unknown format"),
    ("source: x\njobs: [{method: absmax, bits: four}]", "jobs[0].bits: expected an integer"),
    ("source: x\njobs: [{method: absmax, bits: 9}]",
     "jobs[0] (absmax): --bits must be an integer from 2 to 8"),
    ("source: x\njobs: [{method: absmax, methods: [gptq]}]", "give 'method' or 'methods'"),
    ("source: x\ngate: {max_kld: -1}\njobs: [{method: absmax}]",
     "gate: max_kld must be a number >= 0"),
    ("source: x\ngate: {max_ppl: 1}\njobs: [{method: absmax}]",
     "allowed: max_delta_ppl_pct, max_kld, min_top1"),
    ("source: x\neval: {ctx: 4}\njobs: [{method: absmax}]", "eval: --ctx must be"),
    ("source: x\neval: {windows: 4}\njobs: [{method: absmax}]",
     "eval: unknown key 'windows' (did you mean 'n_windows'?)"),
    ("jobs: [{method: absmax}]", "jobs[0]: no source"),
    ("source: x", "'jobs' is missing"),
    ("source: x\njobs: []", "'jobs' is empty"),
    ("source: x\njobs: {method: absmax}", "'jobs' must be a list"),
    ("source: x\njobs: [{method: absmax}, {method: absmax}]", "two jobs are named 'absmax-w4"),
    ("source: x\nupload: {repo: me/one}\njobs: [{method: absmax, bits: [8, 4]}]",
     "two jobs upload to 'me/one'; put {name} in the upload repo"),
    ("source: x\nupload: {repo: 'me/{nam}'}\njobs: [{method: absmax}]",
     "upload.repo: 'me/{nam}' has an unknown placeholder"),
    ("source: x\nupload: {private: true}\njobs: [{method: absmax}]", "'repo' is required"),
    ("source: x\njobs: [{method: absmax, upload: true}]", "needs a recipe-level 'upload:'"),
    ("source: x\njobs: [{method: absmax, targets: {include: 3}}]",
     "targets.include: expected a non-empty string"),
    ("source: x\njobs: [{method: absmax\n", "not valid YAML (line"),
    ("- 1\n- 2", "expected a mapping of name, source"),
]


@pytest.mark.parametrize("text,needle", BAD, ids=[b[1][:40] for b in BAD])
def test_validation_errors_are_one_line(text, needle):
    with pytest.raises(RecipeError) as info:
        Recipe.from_yaml(text, origin="r.yaml")
    message = str(info.value)
    assert message.startswith("r.yaml"), message
    assert needle in message and "\n" not in message, message


def test_cli_refuses_bad_recipe_before_work(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("source: x\njobs: [{method: absmax, bitz: 4}]\n")
    with pytest.raises(SystemExit) as info:
        main(["run", str(path)])
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: r.yaml: jobs[0]: unknown key 'bitz'")


# ---------------------------------------------------------------- end to end on a tiny model

@pytest.fixture
def uploads(monkeypatch):
    """Stand-in for ``quantbench.hub.upload.upload_artifact`` that records its calls."""
    calls = []

    def upload_artifact(artifact_dir, repo_id, *, private=False, revision=None,
                        commit_message=None, token=None, dry_run=False, verify=True):
        calls.append({"artifact": Path(artifact_dir), "repo": repo_id, "private": private,
                      "revision": revision, "dry_run": dry_run})
        return {"url": f"https://huggingface.co/{repo_id}", "dry_run": dry_run}

    try:
        module = importlib.import_module("quantbench.hub.upload")
        monkeypatch.setattr(module, "upload_artifact", upload_artifact)
    except ImportError:  # the Hub module is not in this tree yet
        module = types.ModuleType("quantbench.hub.upload")
        module.upload_artifact = upload_artifact
        monkeypatch.setitem(sys.modules, "quantbench.hub.upload", module)
    return calls


@pytest.fixture
def baseline_builds(monkeypatch):
    """How many times the FP baseline model is built (one per evaluation pass)."""
    import quantbench.recipes.run as recipe_run

    builds = []
    real = recipe_run.source_factory

    def counting(model, device=None):
        build = real(model, device)

        def wrapped():
            builds.append(model.source)
            return build()
        return wrapped

    monkeypatch.setattr(recipe_run, "source_factory", counting)
    return builds


def _recipe(tiny_llama, tmp_path, extra_jobs: str = "") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""
name: tiny
source: {tiny_llama}
output_dir: {tmp_path / 'out'}
eval: {{ctx: 64, max_tokens: 256}}
gate: {{max_kld: 0.001}}
upload: {{repo: "me/tiny-{{name}}", revision: main}}
jobs:
  - {{method: absmax, bits: 8, group_size: 32, format: compressed-tensors}}
  - {{method: absmax, bits: 2, group_size: 32}}
{extra_jobs}""")
    return path


def test_run_gates_uploads_and_reports(tiny_llama, tmp_path, monkeypatch, uploads,
                                       baseline_builds):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    path = _recipe(tiny_llama, tmp_path)
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(cli, ["run", str(path), "--json", str(report_path)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    assert "absmax-w2-g32 (gate)" in result.output
    assert "absmax-w8-g32-compressed-tensors" in result.output and "FAIL" in result.output
    report = json.loads(report_path.read_text())
    assert report["ok"] is False and report["passed"] == 1 and report["failed"] == 1
    good, bad = report["jobs"]
    assert good["name"] == "absmax-w8-g32-compressed-tensors" and good["status"] == "passed"
    assert good["settings"]["format"] == "compressed-tensors" and good["settings"]["bits"] == 8
    assert good["gate"] == {"passed": True, "reasons": [], "thresholds": {"max_kld": 0.001}}
    assert good["upload"]["status"] == "uploaded" and good["upload"]["repo"] == \
        "me/tiny-absmax-w8-g32-compressed-tensors"
    assert good["kld_mean"] < 0.001 < bad["kld_mean"]
    assert bad["status"] == "failed" and bad["gate"]["reasons"][0].startswith("KLD ")
    assert bad["upload"] == {"status": "skipped", "repo": "me/tiny-absmax-w2-g32",
                             "reason": "job failed the gate"}
    for job in (good, bad):
        assert Path(job["artifact"], "quantbench.json").is_file()
        assert job["size_bytes"] > 0 and job["bits_per_weight"] in (8.5, 2.5)
        assert job["ppl"] > 0 and job["n_tokens"] > 0 and job["top1"] is not None
        assert set(job["timings"]) >= {"quantize_write_s", "eval_s"}
        manifest = json.loads(Path(job["artifact"], "quantbench.json").read_text())
        assert manifest["eval"]["kld_mean"] == job["kld_mean"]
    assert [c["repo"] for c in uploads] == ["me/tiny-absmax-w8-g32-compressed-tensors"]
    assert uploads[0]["revision"] == "main" and uploads[0]["dry_run"] is False
    assert len(baseline_builds) == 1 and len(report["baselines"]) == 1
    assert report["baselines"][0]["jobs"] == [good["name"], bad["name"]]


def test_one_baseline_per_source_and_protocol_and_cache(tiny_llama, tmp_path, monkeypatch,
                                                        uploads, baseline_builds):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    extra = ("  - {method: zeropoint, bits: 4, group_size: 32, upload: false}\n"
             "  - {method: zeropoint, bits: 8, group_size: 32, eval: {max_tokens: 128},"
             " upload: false}\n")
    recipe = Recipe.load(_recipe(tiny_llama, tmp_path, extra))
    report = run_recipe(recipe, progress=False, dry_run_upload=True)
    assert len(baseline_builds) == 2
    assert [b.jobs for b in report.baselines] == [
        ["absmax-w8-g32-compressed-tensors", "absmax-w2-g32", "zeropoint-w4-g32"],
        ["zeropoint-w8-g32"]]
    assert not any(b.cached for b in report.baselines)
    assert uploads and all(c["dry_run"] for c in uploads)
    assert report.jobs[0].upload["status"] == "dry-run"
    assert report.path == recipe.output_dir / "recipe-report.json" and report.path.is_file()
    with pytest.raises(RecipeError, match="already exists and is not empty"):
        run_recipe(recipe, progress=False)  # outputs are refused before any work
    path = tmp_path / "recipe.yaml"
    path.write_text(path.read_text() + "overwrite: true\nplot: " + str(tmp_path / "r.png") + "\n")
    again = run_recipe(Recipe.load(path), progress=False, dry_run_upload=True)
    assert all(b.cached for b in again.baselines)  # the evaluator's cache was reused
    png = (tmp_path / "r.png").read_bytes()  # the recipe's plot: a real PNG, named in the report
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert json.loads(again.path.read_text())["plot"] == str(tmp_path / "r.png")
    assert len(baseline_builds) == 4  # KLD needs the baseline's logits: one pass per group


def test_job_error_is_caught_and_the_run_goes_on(tiny_llama, tmp_path, monkeypatch, uploads):
    import quantbench.recipes.run as recipe_run

    real = recipe_run.write_artifact

    def failing(qmodel, out, fmt, **kwargs):
        if Path(out).name == "absmax-w2-g32":
            raise RuntimeError("disk full")
        return real(qmodel, out, fmt, **kwargs)

    monkeypatch.setattr(recipe_run, "write_artifact", failing)
    report = run_recipe(_recipe(tiny_llama, tmp_path), progress=False, dry_run_upload=True)
    good, bad = report.jobs
    assert good.status == "passed" and good.upload["status"] == "dry-run"
    assert bad.status == "error" and bad.error == "quantize/write: RuntimeError: disk full"
    assert bad.upload["reason"] == "job errored" and not report.ok
    assert not (tmp_path / "out" / "absmax-w2-g32").exists()


def test_real_upload_signature_and_dry_run(tiny_llama, tmp_path, monkeypatch):
    """The Hub helper takes what the runner passes; its dry run plans without a network."""
    try:
        module = importlib.import_module("quantbench.hub.upload")
    except ImportError:
        pytest.skip("quantbench.hub.upload is not in this tree yet")
    params = inspect.signature(module.upload_artifact).parameters
    assert list(params)[:2] == ["artifact_dir", "repo_id"]
    for name in ("private", "revision", "commit_message", "token", "dry_run"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = run_recipe(_recipe(tiny_llama, tmp_path), progress=False, dry_run_upload=True)
    good, bad = report.jobs
    assert good.upload["status"] == "dry-run", good.upload
    assert good.upload["result"]["repo_id"] == "me/tiny-absmax-w8-g32-compressed-tensors"
    assert good.upload["result"]["dry_run"] is True and good.upload["result"]["files"] > 0
    assert bad.upload["status"] == "skipped"
