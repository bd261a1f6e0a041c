"""Integrity before use: eval, compare, inspect, upload and recipe steps check every file of an
artifact against the sizes and sha256 of its quantbench.json before reading it, and refuse in
one line naming the file that differs; --no-verify goes on knowingly; an evaluation of files
that do not match is never written into the manifest.

Artifacts of three kinds (dense safetensors, GGUF via ``--type Q8_0``, the GPTQ layout) are
written once; each case damages a fresh copy: one byte flipped in each of its files, a file
truncated, extended, deleted or replaced, an unlisted file a loader would read added, the
manifest itself damaged in many ways.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.faults.conftest import assert_refused

FORMATS = {"dense": ["-g", "32"], "gguf": ["--type", "Q8_0"], "gptq": ["-f", "gptq", "-g", "32"]}
EVAL = ("--ctx", "64", "--max-tokens", "64", "--no-cache")


@pytest.fixture(scope="module")
def artifacts(_pristine_llama, tmp_path_factory) -> Path:
    from quantbench.cli import main

    root = tmp_path_factory.mktemp("integrity")
    for name, args in FORMATS.items():
        main(["convert", str(_pristine_llama), "-o", str(root / name), *args])
    return root


@pytest.fixture
def copy(artifacts, tmp_path):
    """``copy("dense")`` → a fresh copy of that artifact to damage."""
    def make(fmt: str, name: str | None = None) -> Path:
        return Path(shutil.copytree(artifacts / fmt, tmp_path / (name or fmt)))
    return make


def listed(art: Path) -> list[str]:
    return sorted(json.loads((art / "quantbench.json").read_text())["files"])


def flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x5A
    path.write_bytes(bytes(data))


def manifest_eval(art: Path):
    return json.loads((art / "quantbench.json").read_text())["eval"]


def assert_all_refuse(qb, art: Path, *needles: str, target: Path | None = None) -> None:
    """eval, inspect and upload --dry-run each refuse in one line naming the problem; nothing
    is recorded in the manifest."""
    target = target or art
    before = (art / "quantbench.json").read_bytes()
    for args in (("eval", target, *EVAL), ("inspect", target),
                 ("upload", art, "--repo", "me/x", "--dry-run")):
        assert_refused(qb(*args), *needles)
    assert (art / "quantbench.json").read_bytes() == before


# -- files that differ from the manifest ----------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_a_flipped_byte_in_any_file_is_refused_naming_it(qb, copy, fmt):
    for name in listed(copy(fmt, "probe")):
        art = copy(fmt, f"flip-{name}")
        flip(art / name)
        assert_all_refuse(qb, art, name, "sha256 differs", "--no-verify")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("damage", ["truncated", "extended", "deleted", "emptied", "a folder"])
def test_a_weight_file_changed_in_size_or_gone_is_refused(qb, copy, fmt, damage):
    art = copy(fmt)
    weight = art / ("model.gguf" if fmt == "gguf" else "model.safetensors")
    data = weight.read_bytes()
    if damage == "truncated":
        weight.write_bytes(data[: len(data) - 100])
    elif damage == "extended":
        weight.write_bytes(data + b"\0" * 8)
    elif damage == "emptied":
        weight.write_bytes(b"")
    else:
        weight.unlink()
        if damage == "a folder":
            weight.mkdir()
    why = {"deleted": "missing", "a folder": "not a regular file"}.get(damage, "bytes")
    assert_all_refuse(qb, art, weight.name, why)


@pytest.mark.parametrize("fmt", ["dense", "gptq"])
def test_a_replaced_config_is_refused(qb, copy, fmt):
    art = copy(fmt)
    config = json.loads((art / "config.json").read_text())
    config["num_hidden_layers"] = 1  # self-consistent, valid JSON, another model
    (art / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    assert_all_refuse(qb, art, "config.json", "re-convert")


@pytest.mark.parametrize("fmt,extra", [
    ("dense", "model-00002-of-00002.safetensors"), ("gptq", "extra.safetensors"),
    ("dense", "model.safetensors.index.json"), ("dense", "pytorch_model.bin"),
    ("gptq", "modeling_llama.py"), ("gguf", "config.json"), ("gguf", "other.gguf"),
    ("dense", "chat_template.jinja"), ("gguf", "tokenizer.model"), ("dense", "merges.txt"),
    ("gptq", "tokenizer.model.v3"), ("dense", "tekken.json"), ("gguf", "params.json"),
    ("dense", "special_tokens_map.json"), ("gptq", "weights.pt"), ("dense", "model.onnx")])
def test_an_unlisted_file_a_loader_reads_is_refused(qb, copy, fmt, extra):
    art = copy(fmt)
    source = art / ("model.gguf" if fmt == "gguf" else "model.safetensors")
    shutil.copy(source if extra.endswith((".safetensors", ".gguf", ".bin")) else
                art / "quantbench.json", art / extra)
    assert_all_refuse(qb, art, extra, "not listed", "move the files it does not list")


INERT = ("README.md", "LICENSE", "plot.png", ".DS_Store", "notes.txt", "eval.json",
         "compare.json", "results.csv")


def test_files_no_loader_reads_are_no_difference(qb, copy, _pristine_llama):
    art = copy("dense")
    for name in INERT:
        (art / name).write_text("notes")
    (art / "subfolder").mkdir()
    result = qb("inspect", art)
    assert result.code == 0, result.stderr
    from quantbench import inspect

    assert inspect(art)["files_ok"] is True
    result = qb("upload", art, "--repo", "me/x", "--dry-run")
    assert result.code == 0, result.stderr  # as before: named, not uploaded
    assert "not in the manifest, not uploaded: " in result.stderr
    result = qb("eval", art, *EVAL)
    assert result.code == 0, result.stderr
    assert manifest_eval(art)["ppl"] > 1


# -- a manifest that cannot vouch for anything ------------------------------------------------

def _rewrite(art: Path, edit) -> None:
    manifest = json.loads((art / "quantbench.json").read_text())
    edit(manifest)
    (art / "quantbench.json").write_text(json.dumps(manifest))


MANIFESTS = {
    "truncated": lambda art: (art / "quantbench.json").write_bytes(
        (art / "quantbench.json").read_bytes()[:200]),
    "binary": lambda art: (art / "quantbench.json").write_bytes(b"\xff\xfe\0garbage"),
    "empty": lambda art: (art / "quantbench.json").write_text(""),
    "an array": lambda art: (art / "quantbench.json").write_text("[1, 2]"),
    "a string": lambda art: (art / "quantbench.json").write_text('"quantbench"'),
    "null": lambda art: (art / "quantbench.json").write_text("null"),
    "no files": lambda art: _rewrite(art, lambda m: m.pop("files")),
    "empty files": lambda art: _rewrite(art, lambda m: m.update(files={})),
    "files a list": lambda art: _rewrite(art, lambda m: m.update(files=list(m["files"]))),
    "entry no sha256": lambda art: _rewrite(art, lambda m: next(iter(m["files"].values())).pop(
        "sha256")),
    "short sha256": lambda art: _rewrite(art, lambda m: next(iter(m["files"].values())).update(
        sha256="abc")),
    "bytes a string": lambda art: _rewrite(art, lambda m: next(iter(m["files"].values())).update(
        bytes="12")),
    "negative bytes": lambda art: _rewrite(art, lambda m: next(iter(m["files"].values())).update(
        bytes=-1)),
    "outside name": lambda art: _rewrite(art, lambda m: m["files"].update(
        {"../secret.txt": {"bytes": 1, "sha256": "0" * 64}})),
    "nested name": lambda art: _rewrite(art, lambda m: m["files"].update(
        {"sub/x.json": {"bytes": 1, "sha256": "0" * 64}})),
    "lists itself": lambda art: _rewrite(art, lambda m: m["files"].update(
        {"quantbench.json": {"bytes": 1, "sha256": "0" * 64}})),
    "source a number": lambda art: _rewrite(art, lambda m: m.update(source=5)),
    "source id a list": lambda art: _rewrite(art, lambda m: m["source"].update(id=[1])),
    "format an object": lambda art: _rewrite(art, lambda m: m.update(format={})),
    "eval a string": lambda art: _rewrite(art, lambda m: m.update(eval="good")),
    "bare NaN": lambda art: (art / "quantbench.json").write_text(
        (art / "quantbench.json").read_text().replace('"eval": null', '"eval": NaN')),
    "a folder": lambda art: ((art / "quantbench.json").unlink(),
                             (art / "quantbench.json").mkdir()),
}


@pytest.mark.parametrize("damage", MANIFESTS)
@pytest.mark.parametrize("fmt", ["dense", "gguf"])
def test_a_damaged_manifest_is_refused_in_one_line(qb, copy, fmt, damage):
    art = copy(fmt)
    MANIFESTS[damage](art)
    for args in (("eval", art, *EVAL), ("inspect", art),
                 ("upload", art, "--repo", "me/x", "--dry-run")):
        line = assert_refused(qb(*args), "quantbench.json")
        if args[0] != "upload" or damage != "a folder":
            assert "not a quantbench artifact" in line or "not valid JSON" in line or \
                "not a JSON object" in line or "is damaged" in line, line


# -- where the artifact is named through a file, and where nothing vouches for it --------------

def test_a_gguf_inside_an_output_dir_is_verified_and_a_bare_gguf_is_not(qb, copy, tmp_path,
                                                                      _pristine_llama):
    art = copy("gguf")
    result = qb("eval", art / "model.gguf", *EVAL)
    assert result.code == 0, result.stderr
    assert manifest_eval(art)["ppl"] > 1  # recorded: the file's directory vouches for it
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(art / "model.gguf", bare / "mine.gguf")
    flip(art / "model.gguf", at=-1)
    assert_refused(qb("eval", art / "model.gguf", *EVAL), "model.gguf", "sha256 differs")
    assert_refused(qb("inspect", art / "model.gguf"), "model.gguf", "sha256 differs")
    result = qb("eval", bare / "mine.gguf", "--baseline", _pristine_llama, *EVAL)
    assert result.code == 0, result.stderr  # nothing to verify: used as before
    result = qb("inspect", bare / "mine.gguf")
    assert result.code == 0 and "files_ok" in result.stdout and "None" in result.stdout


def test_a_checkpoint_without_a_manifest_is_used_as_today(qb, _pristine_llama):
    result = qb("inspect", _pristine_llama)
    assert result.code == 0, result.stderr


def test_a_damaged_quantbench_output_as_baseline_or_source_is_refused(
        qb, copy, tmp_path):
    target, base = copy("gptq"), copy("dense", "base")
    flip(base / "config.json")
    assert_refused(qb("eval", target, "--baseline", base, *EVAL), "base", "config.json")
    assert_refused(qb("compare", base, "--method", "zeropoint", "--bits", "8", "-g", "32",
                      *EVAL, "--json", tmp_path / "c.json", "--plot", ""), "config.json")
    assert not (tmp_path / "c.json").exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"source: {base}\noutput_dir: {tmp_path / 'out'}\n"
                      "jobs: [{method: zeropoint, bits: 8, group_size: 32}]\n")
    assert_refused(qb("run", recipe), "r.yaml", "config.json not as quantbench.json records")
    assert not (tmp_path / "out").exists()
    assert manifest_eval(target) is None


# -- --no-verify: used knowingly, never recorded -------------------------------------------------

def test_no_verify_goes_on_but_the_evaluation_is_not_recorded(qb, copy, caplog):
    art = copy("dense")
    flip(art / "model.safetensors", at=-2)  # a low byte of the data: still finite, still opens
    with caplog.at_level("WARNING"):
        result = qb("eval", art, *EVAL, "--no-verify")
    assert result.code == 0, result.stderr
    assert "(--no-verify)" in caplog.text and "evaluation not recorded" in caplog.text
    assert manifest_eval(art) is None
    result = qb("inspect", art, "--no-verify")
    assert result.code == 0, result.stderr
    result = qb("upload", art, "--repo", "me/x", "--dry-run", "--no-verify")
    assert result.code == 0 and "nothing was sent" in result.stderr, result.stderr


def test_python_api_verify_keyword(copy):
    import quantbench as qb_api
    from quantbench.errors import FormatError

    art = copy("dense")
    flip(art / "model.safetensors", at=-2)
    with pytest.raises(FormatError, match="model.safetensors not as quantbench.json records"):
        qb_api.evaluate(art, ctx=64, max_tokens=64, use_cache=False)
    with pytest.raises(FormatError, match="verify=False"):
        qb_api.upload(art, "me/x", dry_run=True)
    info = qb_api.inspect(art)
    assert info["files_ok"] is False
    assert info["files_failed"] == [{"name": "model.safetensors", "why": "sha256 differs"}]
    assert qb_api.inspect(art, verify=False)["files_ok"] is None
    report = qb_api.evaluate(art, ctx=64, max_tokens=64, use_cache=False, verify=False)
    assert report.results["dense"].ppl > 1
    assert qb_api.upload(art, "me/x", dry_run=True, verify=False).dry_run
    assert manifest_eval(art) is None


def test_inspect_prints_its_table_then_exits_non_zero(qb, copy):
    art = copy("gptq")
    flip(art / "quantize_config.json")
    (art / "stray.safetensors").write_bytes(b"not even safetensors")
    result = qb("inspect", art, "--tensors")
    line = assert_refused(result, "quantize_config.json", "stray.safetensors")
    assert "files_ok" in result.stdout and "False" in result.stdout
    assert "quantize_config.json: sha256 differs" in result.stdout
    assert line.startswith(f"error: {art}: quantize_config.json not as quantbench.json records")
    truncated = copy("dense", "truncated")  # too damaged to read: the table says so
    (truncated / "model.safetensors").write_bytes(b"\0" * 8)
    result = qb("inspect", truncated)
    assert_refused(result, "model.safetensors", "8 bytes")
    assert "unreadable" in result.stdout


# -- compare and recipes: the damaged artifact is that row's / job's error --------------------------

def _damaging(monkeypatch, module: str, victim: str, damage) -> None:
    """Wrap ``module.write_artifact`` so the artifact named ``victim`` is damaged right after
    it is written (between the write and the read that must verify it)."""
    import importlib

    mod = importlib.import_module(module)
    real = mod.write_artifact

    def write(qmodel, out, *args, **kwargs):
        path = real(qmodel, out, *args, **kwargs)
        if Path(out).name == victim:
            damage(Path(out))
        return path
    monkeypatch.setattr(mod, "write_artifact", write)


def test_compare_row_with_a_damaged_artifact_is_its_error(qb, _pristine_llama, tmp_path,
                                                          monkeypatch):
    _damaging(monkeypatch, "quantbench.eval.compare", "zeropoint-w4-g32",
              lambda art: flip(art / "model.safetensors", at=-2))
    out = tmp_path / "c.json"
    result = qb("compare", _pristine_llama, "--method", "zeropoint", "--bits", "8,4", "-g",
                "32", "--format", "dense", "--out-dir", tmp_path / "arts", *EVAL,
                "--json", out, "--plot", "")
    assert result.code == 1 and "Traceback" not in result.stderr
    last = result.lines[-1]
    assert last.startswith("error: 1 of 2 rows have no result") and \
        "model.safetensors not as quantbench.json records" in last
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["zeropoint-w8-g32"]["ppl"] > 1 and rows["zeropoint-w4-g32"]["ppl"] is None
    assert "zeropoint-w4-g32" in json.loads(out.read_text())["errors"]
    assert manifest_eval(tmp_path / "arts" / "zeropoint-w4-g32") is None
    assert manifest_eval(tmp_path / "arts" / "zeropoint-w8-g32")["ppl"] > 1


RECIPE = """
source: {source}
output_dir: {out}
{extra}
eval: {{ctx: 64, max_tokens: 64, cache: false}}
upload: {{repo: "me/tiny-{{name}}"}}
jobs:
  - {{method: zeropoint, bits: 8, group_size: 32, format: dense, name: good}}
  - {{method: zeropoint, bits: 4, group_size: 32, format: dense, name: bad}}
"""


@pytest.mark.parametrize("verify", [True, False])
def test_recipe_job_with_a_damaged_artifact(qb, _pristine_llama, tmp_path, monkeypatch, caplog,
                                            verify):
    _damaging(monkeypatch, "quantbench.recipes.run", "bad",
              lambda art: flip(art / "model.safetensors", at=-2))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(source=_pristine_llama, out=tmp_path / "out",
                                    extra="" if verify else "verify: false"))
    with caplog.at_level("WARNING"):
        result = qb("run", recipe, "--dry-run-upload")
    report = json.loads((tmp_path / "out" / "recipe-report.json").read_text())
    jobs = {j["name"]: j for j in report["jobs"]}
    assert jobs["good"]["status"] == "passed" and jobs["good"]["upload"]["status"] == "dry-run"
    assert manifest_eval(tmp_path / "out" / "good")["ppl"] > 1
    assert manifest_eval(tmp_path / "out" / "bad") is None  # never, verified or not
    if verify:
        assert result.code == 1 and result.lines[-1].startswith("error: 1 of 2 jobs failed")
        assert jobs["bad"]["status"] == "error"
        assert jobs["bad"]["error"].startswith("verify: ")
        assert "model.safetensors not as quantbench.json records" in jobs["bad"]["error"]
        assert jobs["bad"]["upload"]["status"] == "skipped"
    else:  # evaluated and uploaded knowingly; a warning says the eval was not recorded
        assert result.code == 0, result.stderr
        assert jobs["bad"]["ppl"] > 1 and "evaluation not recorded" in caplog.text
