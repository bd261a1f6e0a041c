"""A path that looks local and is not there says "does not exist" (never a Hugging Face Hub
network error), in every command that takes a model or an artifact; a folder that is neither
an artifact nor a checkpoint is told what an artifact is and how to make one."""
from __future__ import annotations

import pytest

from tests.faults.conftest import assert_refused

EVAL = ("--ctx", "64", "--max-tokens", "64", "--no-cache")


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A working folder with an ``out/`` in it; the Hub is offline, so a path wrongly taken
    for a Hub id fails fast (and would say "Hub")."""
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.mark.parametrize("text, local", [
    ("out/nope", True),         # its first part is a folder here
    ("elsewhere/nope", False),  # could be a Hub id: org/name
    ("HuggingFaceTB/SmolLM2-135M", False),
    ("./nope", True), ("/abs/nope", True), ("~/nope", True), ("a/b/c", True),
    ("org/model.gguf", True), ("model.safetensors", True), ("dir\\nope", True),
])
def test_looks_local(here, text, local):
    from quantbench.localpath import looks_local

    assert looks_local(text) is local


COMMANDS = {
    "convert": lambda p, tmp: ("convert", p, "-o", tmp / "o"),
    "eval": lambda p, tmp: ("eval", p, *EVAL),
    "compare": lambda p, tmp: ("compare", p, "--json", tmp / "c.json", "--plot", ""),
    "inspect": lambda p, tmp: ("inspect", p),
    "upload": lambda p, tmp: ("upload", p, "--repo", "me/x", "--dry-run"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("path", ["out/nope", "nope.gguf", "./missing"])
def test_missing_local_path_says_so(qb, here, command, path):
    shown = path.removeprefix("./")  # click's Path arguments drop a leading ./
    line = assert_refused(qb(*COMMANDS[command](path, here)), f"{shown} does not exist")
    assert "fetch" not in line and "Hugging Face" not in line


def test_missing_baseline_says_so(qb, here, fresh_llama):
    src = fresh_llama()
    art = here / "art"
    assert qb("convert", src, "-g", "32", "-o", art).code == 0
    line = assert_refused(qb("eval", art, "--baseline", "out/nope", *EVAL),
                          "out/nope does not exist")
    assert "fetch" not in line and "Hugging Face" not in line


def test_missing_parent_is_named(qb, here):
    assert_refused(qb("inspect", "out/a/b"), "out/a/b does not exist (nor does out/a)")


def test_a_hub_id_that_cannot_be_fetched_says_it_is_not_local_either(qb, here):
    assert_refused(qb("convert", "someorg/somemodel", "-o", here / "o"),
                   "someorg/somemodel is not a local path", "Hub", "HF_HUB_OFFLINE")


@pytest.mark.parametrize("command", ["eval", "inspect"])
def test_a_folder_that_is_not_an_artifact(qb, here, command):
    (here / "notes").mkdir()
    (here / "notes" / "readme.txt").write_text("hello")
    args = ("eval", "notes", *EVAL) if command == "eval" else ("inspect", "notes")
    assert_refused(qb(*args), "notes is neither a quantbench artifact nor a model checkpoint",
                   "quantbench convert SRC -o OUT", "quantbench.json")
