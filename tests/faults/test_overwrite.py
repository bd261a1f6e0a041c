"""Class 4: nothing quantbench did not write is ever replaced.

``--overwrite`` replaces an empty folder or a quantbench output (a quantbench manifest and the
files it lists); any other folder is refused before any work, naming what is in it. An output
at or above the working directory, quantbench's cache or a source (however spelled: ``..``,
symlinks) is refused before anything is loaded, with or without ``--overwrite``. Report paths
(``--json``, ``--plot``, a recipe's report) never replace a folder, a source or a model's file.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.faults.conftest import assert_no_leftovers, assert_refused

CONVERT = ("-m", "absmax", "-b", "8", "-g", "32")


def tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones too) with the sha256 of each file."""
    folder = Path(folder)
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        found[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QUANTBENCH_STORE", str(tmp_path / "store"))


# -- --overwrite on folders quantbench did not write ------------------------------------------

def _file(d: Path) -> str:
    (d / "notes.txt").write_text("my notes")
    return "notes.txt"


def _subfolder(d: Path) -> str:
    (d / "data").mkdir()
    (d / "data" / "train.bin").write_bytes(b"\0" * 10)
    return "data/"


def _hidden(d: Path) -> str:
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return ".git/"


def _many(d: Path) -> str:
    for i in range(12):
        (d / f"f{i:02d}.txt").write_text(str(i))
    return "(12 entries)"


def _manifest(text: str):
    def make(d: Path) -> str:
        (d / "quantbench.json").write_text(text)
        (d / "model.safetensors").write_bytes(b"user weights")
        return "model.safetensors"
    return make


FOREIGN = {
    "a file": _file,
    "a subfolder": _subfolder,
    "a hidden folder": _hidden,
    "many files": _many,
    "a manifest that is not JSON": _manifest("{not json"),
    "a manifest that is a list": _manifest("[1, 2]"),
    "another tool's manifest": _manifest(json.dumps({"tool": {"name": "other"}, "files": {}})),
    "a manifest without files": _manifest(json.dumps({"tool": {"name": "quantbench"}})),
}


@pytest.mark.parametrize("kind", FOREIGN)
def test_overwrite_refuses_a_folder_quantbench_did_not_write(qb, fresh_llama, tmp_path,
                                                             no_work, kind):
    src = fresh_llama("src")
    out = tmp_path / "out"
    out.mkdir()
    needle = FOREIGN[kind](out)
    before = tree(out)
    line = assert_refused(qb("convert", src, "-o", out, "--overwrite", *CONVERT),
                          str(out), needle, "--overwrite")
    assert "entr" in line  # the count of what is there
    assert tree(out) == before
    assert_no_leftovers(tmp_path, keep=("src", "out"))


@pytest.mark.parametrize("extra", ["notes.txt", "eval-by-hand/"])
def test_overwrite_refuses_a_quantbench_output_holding_user_files(qb, fresh_llama, tmp_path,
                                                                  extra):
    src = fresh_llama("src")
    out = tmp_path / "out"
    assert qb("convert", src, "-o", out, *CONVERT).code == 0
    if extra.endswith("/"):
        (out / extra).mkdir()
        (out / extra / "x.json").write_text("{}")
    else:
        (out / extra).write_text("mine")
    before = tree(out)
    assert_refused(qb("convert", src, "-o", out, "--overwrite", "-m", "absmax", "-b", "4",
                      "-g", "32"), extra, "did not write")
    assert tree(out) == before
    assert_no_leftovers(tmp_path, keep=("src", "out", "cache", "store"))


@pytest.mark.parametrize("previous", ["empty", "quantbench output"])
def test_overwrite_replaces_an_empty_folder_or_a_quantbench_output(qb, fresh_llama, tmp_path,
                                                                   previous):
    src = fresh_llama("src")
    out = tmp_path / "out"
    if previous == "empty":
        out.mkdir()
    else:
        assert qb("convert", src, "-o", out, "-m", "absmax", "-b", "4", "-g", "32").code == 0
    result = qb("convert", src, "-o", out, "--overwrite", *CONVERT)
    assert result.code == 0, result.stderr
    manifest = json.loads((out / "quantbench.json").read_text())
    assert manifest["quantize"]["grid"]["bits"] == 8
    assert_no_leftovers(tmp_path, keep=("src", "out", "cache", "store"))


def test_without_overwrite_a_non_empty_output_is_refused(qb, fresh_llama, tmp_path, no_work):
    src = fresh_llama("src")
    out = tmp_path / "out"
    out.mkdir()
    _file(out)
    assert_refused(qb("convert", src, "-o", out, *CONVERT), "already exists", "--overwrite")


# -- outputs at or above what must not be replaced --------------------------------------------

def _cwd(tmp, src, monkeypatch):
    monkeypatch.chdir(tmp / "work")
    return ".", "working directory"


def _above_cwd(tmp, src, monkeypatch):
    (tmp / "work" / "deeper").mkdir()
    monkeypatch.chdir(tmp / "work" / "deeper")
    return "..", "working directory"


def _cwd_dotdot(tmp, src, monkeypatch):
    monkeypatch.chdir(tmp / "work")
    return "sub/..", "working directory"


def _source(tmp, src, monkeypatch):
    return src, "the source"


def _source_dotdot(tmp, src, monkeypatch):
    return f"{src}/nothing/..", "the source"


def _above_source(tmp, src, monkeypatch):
    return tmp, "contains"


def _through_symlinked_parent(tmp, src, monkeypatch):
    (tmp / "alias").symlink_to(tmp, target_is_directory=True)
    return tmp / "alias" / src.name, "the source"


def _symlink_to_source(tmp, src, monkeypatch):
    (tmp / "link").symlink_to(src, target_is_directory=True)
    return tmp / "link", "symbolic link"


def _cache(tmp, src, monkeypatch):
    return tmp / "cache", "quantbench's cache"


PROTECTED = {
    "the working directory": _cwd,
    "above the working directory": _above_cwd,
    "the working directory via ..": _cwd_dotdot,
    "the source": _source,
    "the source via ..": _source_dotdot,
    "above the source": _above_source,
    "the source through a symlinked parent": _through_symlinked_parent,
    "a symlink to the source": _symlink_to_source,
    "quantbench's cache": _cache,
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["", "overwrite"])
@pytest.mark.parametrize("case", PROTECTED)
def test_output_at_or_above_a_protected_folder_is_refused_up_front(
        qb, fresh_llama, tmp_path, monkeypatch, no_work, case, overwrite):
    src = fresh_llama("src")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "keep.txt").write_text("mine")
    (tmp_path / "cache").mkdir()
    output, needle = PROTECTED[case](tmp_path, src, monkeypatch)
    before = tree(tmp_path)
    flags = ("--overwrite",) if overwrite else ()
    assert_refused(qb("convert", src, "-o", output, *flags, *CONVERT), needle)
    assert tree(tmp_path) == before


def test_a_gguf_sources_folder_is_protected(qb, tmp_path, no_work):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "m.gguf").write_bytes(b"GGUF not really")  # refused before it is read
    for output in (folder, tmp_path, folder / "m.gguf"):  # the folder, above it, the file
        assert_refused(qb("convert", folder / "m.gguf", "-o", output, "--overwrite"),
                       "the source")
        assert_refused(qb("convert", folder / "m.gguf", "-o", output, "--type", "Q8_0"),
                       "the source")
    assert sorted(p.name for p in folder.iterdir()) == ["m.gguf"]


def test_a_samples_cache_is_protected(qb, tmp_path, no_work):
    cached = tmp_path / "cache" / "samples" / "smollm2-fp16"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    assert_refused(qb("convert", "sample:smollm2", "-o", cached, "--overwrite", *CONVERT),
                   "sample:smollm2")
    assert (cached / "config.json").read_text() == "{}"


# -- the Python API, compare and recipes follow the same rules --------------------------------

def test_api_save_with_overwrite_follows_the_rules(fresh_llama, tmp_path):
    import quantbench as qb_api
    from quantbench.errors import QuantbenchError

    src = fresh_llama("src")
    q = qb_api.quantize(str(src), method="absmax", bits=8, group_size=32)
    mine = tmp_path / "mine"
    mine.mkdir()
    _file(mine)
    with pytest.raises(QuantbenchError, match="not a quantbench output"):
        qb_api.save(q, mine, overwrite=True)
    with pytest.raises(QuantbenchError, match="is the source"):
        qb_api.save(q, src, overwrite=True)
    with pytest.raises(QuantbenchError, match="contains the source"):
        qb_api.save(q, tmp_path, overwrite=True)
    assert (mine / "notes.txt").read_text() == "my notes"
    out = qb_api.save(q, tmp_path / "out")
    qb_api.save(q, out, overwrite=True)  # its own output: replaced
    assert_no_leftovers(tmp_path, keep=("src", "mine", "out", "cache", "store"))


def test_compare_out_dir_never_replaces_a_foreign_folder(qb, fresh_llama, tmp_path):
    src = fresh_llama("src")
    job = tmp_path / "runs" / "absmax-w8-g32"
    job.mkdir(parents=True)
    _file(job)
    before = tree(tmp_path / "runs")
    result = qb("compare", src, "-m", "absmax", "-b", "8", "-g", "32", "--out-dir",
                tmp_path / "runs", "--json", tmp_path / "c.json", "--plot", "")
    assert_refused(result, "notes.txt", "not a quantbench output")
    assert tree(tmp_path / "runs") == before
    assert not (tmp_path / "c.json").exists()


REPORTS = {
    "--json a directory": lambda t, s: (("--json", t), "is a directory"),
    "--json the source's config": lambda t, s: (("--json", s / "config.json"), "the source"),
    "--json a file in the source": lambda t, s: (("--json", s / "tokenizer_config.json"),
                                                "the source"),
    "--json a user file in the source": lambda t, s: (("--json", s / "README.md"), "the source"),
    "--json the output": lambda t, s: (("--json", t / "out"), "the output"),
    "--json another model's weights": lambda t, s: (("--json", t / "other" / "model.safetensors"),
                                                   "file of the model"),
    "--json another model's config": lambda t, s: (("--json", t / "other" / "config.json"),
                                                  "file of the model"),
}


@pytest.mark.parametrize("case", REPORTS)
def test_convert_report_paths_are_checked_up_front(qb, fresh_llama, tmp_path, no_work, case):
    src = fresh_llama("src")
    (src / "README.md").write_text("my model card")
    other = fresh_llama("other")
    flags, needle = REPORTS[case](tmp_path, src)
    before = tree(tmp_path)
    assert_refused(qb("convert", src, "-o", tmp_path / "out", *CONVERT, *flags), needle)
    assert tree(tmp_path) == before and other.is_dir()


def test_a_new_report_beside_or_inside_the_source_is_fine(qb, fresh_llama, tmp_path):
    src = fresh_llama("src")
    result = qb("convert", src, "-o", tmp_path / "out", *CONVERT, "--json", src / "q.json")
    assert result.code == 0, result.stderr
    assert json.loads((src / "q.json").read_text())["format"] == "dense"


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_compare_report_paths_are_checked_up_front(qb, fresh_llama, tmp_path, no_work, flag):
    src = fresh_llama("src")
    (tmp_path / "taken").mkdir()
    other = {"--json": "--plot", "--plot": "--json"}[flag]
    assert_refused(qb("compare", src, "-m", "absmax", "-b", "8", "-g", "32", flag,
                      tmp_path / "taken", other, tmp_path / "x"), flag, "is a directory")
    assert_refused(qb("compare", src, "-m", "absmax", "-b", "8", "-g", "32", flag,
                      src / "tokenizer.json", other, tmp_path / "x"), flag, "the source")


def test_inspect_json_never_replaces_a_file_of_the_artifact(qb, fresh_llama, tmp_path):
    src = fresh_llama("src")
    out = tmp_path / "out"
    assert qb("convert", src, "-o", out, *CONVERT).code == 0
    manifest = (out / "quantbench.json").read_bytes()
    for name in ("quantbench.json", "config.json", "model.safetensors"):
        assert_refused(qb("inspect", out, "--json", out / name), "file of the model")
    assert_refused(qb("inspect", out, "--json", tmp_path), "is a directory")
    assert (out / "quantbench.json").read_bytes() == manifest


def test_recipe_outputs_and_report_follow_the_rules(qb, fresh_llama, tmp_path):
    src = fresh_llama("src")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"source: {src}\noutput_dir: {tmp_path / 'runs'}\noverwrite: true\n"
                      "eval: {ctx: 64, max_tokens: 256}\n"
                      "jobs:\n  - {method: absmax, bits: 8, group_size: 32}\n")
    job = tmp_path / "runs" / "absmax-w8-g32"
    job.mkdir(parents=True)
    _file(job)
    assert_refused(qb("run", recipe), "absmax-w8-g32", "not a quantbench output")
    assert (job / "notes.txt").read_text() == "my notes"
    (job / "notes.txt").unlink()
    assert_refused(qb("run", recipe, "--json", tmp_path), "is a directory")
    assert_refused(qb("run", recipe, "--json", src / "config.json"), "the source")
    assert sorted(os.listdir(job)) == []
