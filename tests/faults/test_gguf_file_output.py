"""``-o NAME.gguf`` writes that file, with its manifest beside it as
``NAME.gguf.quantbench.json``; a directory ``-o`` keeps its layout, and the GGUF bytes are the
same in both. Everything that reads an artifact takes the file (inspect, eval, upload, the
baseline of eval, recording an evaluation); the safety rules of directory outputs hold for it:
atomic install (sidecar last), ``--overwrite`` only over a quantbench output or a GGUF, never a
source, refusals before any work, no temporaries left.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.faults.conftest import assert_no_leftovers, assert_refused

Q8 = ("--type", "Q8_0")
EVAL = ("--ctx", "64", "--max-tokens", "64", "--no-cache")
IMATRIX = ("--method", "imatrix", "--type", "Q4_0", "--calib-samples", "2", "--calib-len", "32")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QUANTBENCH_STORE", str(tmp_path / "store"))


@pytest.fixture(scope="module")
def written(_pristine_llama, tmp_path_factory) -> Path:
    """The same Q8_0 conversion written as a directory (``dir``) and as a file (``q8.gguf``)."""
    from quantbench.cli import main

    root = tmp_path_factory.mktemp("gguf-file")
    for out in (root / "dir", root / "q8.gguf"):
        main(["convert", str(_pristine_llama), "-o", str(out), *Q8])
    return root


@pytest.fixture
def copy(written, tmp_path):
    """A fresh copy of the file output (the GGUF and its sidecar) in ``tmp_path/art``."""
    folder = tmp_path / "art"
    folder.mkdir()
    for name in ("q8.gguf", "q8.gguf.quantbench.json"):
        shutil.copy(written / name, folder / name)
    return folder / "q8.gguf"


def sidecar(file: Path) -> Path:
    return file.with_name(file.name + ".quantbench.json")


def manifest(file: Path) -> dict:
    return json.loads(sidecar(file).read_text())


def flip(path: Path, at: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x5A
    path.write_bytes(bytes(data))


# -- the layout ----------------------------------------------------------------------------------

def test_a_gguf_name_writes_that_file_with_its_manifest_beside_it(written):
    assert sorted(p.name for p in written.iterdir()) == ["dir", "q8.gguf",
                                                         "q8.gguf.quantbench.json"]
    assert sorted(p.name for p in (written / "dir").iterdir()) == ["model.gguf",
                                                                   "quantbench.json"]
    gguf = (written / "q8.gguf").read_bytes()
    assert gguf == (written / "dir" / "model.gguf").read_bytes()  # the same bytes, either way
    side, inner = manifest(written / "q8.gguf"), json.loads(
        (written / "dir" / "quantbench.json").read_text())
    assert side["files"] == {"q8.gguf": inner["files"]["model.gguf"]}
    assert side["summary"]["size_bytes"] == len(gguf) == inner["summary"]["size_bytes"]
    for key in ("format", "source", "quantize", "tensors"):
        assert side[key] == inner[key]


def test_inspect_and_eval_take_the_file_and_record_into_its_sidecar(qb, copy):
    result = qb("inspect", copy)
    assert result.code == 0, result.stderr
    assert "rtn GGUF Q8_0" in result.stdout and "True" in result.stdout  # method, files_ok
    result = qb("eval", copy, *EVAL)  # the baseline is the source its manifest names
    assert result.code == 0, result.stderr
    assert manifest(copy)["eval"]["ppl"] > 1
    assert sorted(p.name for p in copy.parent.iterdir()) == ["q8.gguf",
                                                             "q8.gguf.quantbench.json"]


def test_a_changed_file_or_sidecar_is_refused_naming_it(qb, copy, tmp_path):
    shutil.copy(copy, copy.parent / "other.gguf")  # a bare GGUF, evaluated against the damaged
    flip(copy)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"source: {copy}\noutput_dir: {tmp_path / 'out'}\n"
                      "jobs: [{method: rtn, type: Q4_0}]\n")
    for args in (("eval", copy, *EVAL), ("inspect", copy),
                 ("upload", copy, "--repo", "me/x", "--dry-run"),
                 ("eval", copy.parent / "other.gguf", "--baseline", copy, *EVAL),
                 ("compare", copy, "--method", "zeropoint", "--bits", "8", "-g", "32", *EVAL,
                  "--plot", ""), ("run", recipe)):
        assert_refused(qb(*args), "q8.gguf", "not as q8.gguf.quantbench.json records",
                       "sha256 differs")
    sidecar(copy).write_text("{not json")
    assert_refused(qb("eval", copy, *EVAL), "q8.gguf.quantbench.json")
    assert_refused(qb("inspect", copy), "q8.gguf.quantbench.json")


def test_a_bare_gguf_is_used_as_before(qb, copy, _pristine_llama):
    sidecar(copy).unlink()
    result = qb("inspect", copy)
    assert result.code == 0 and "None" in result.stdout  # nothing vouches for it: not checked
    assert_refused(qb("upload", copy, "--repo", "me/x", "--dry-run"),
                   "has no q8.gguf.quantbench.json beside it")
    result = qb("eval", copy, "--baseline", _pristine_llama, *EVAL)
    assert result.code == 0, result.stderr
    assert not sidecar(copy).exists()


def test_upload_sends_the_file_its_sidecar_and_a_card(copy):
    from quantbench.hub.upload import plan_upload

    (copy.parent / "notes.txt").write_text("not part of it")  # the folder is not the artifact
    plan = plan_upload(copy, "me/q8", command="quantbench convert SRC -t Q8_0 -o q8.gguf")
    assert [name for name, _ in plan.files] == ["q8.gguf", "q8.gguf.quantbench.json",
                                                "README.md"]
    assert plan.skipped == []
    assert "llama-cli -m q8/q8.gguf" in plan.card and "quantbench eval q8/q8.gguf" in plan.card


# -- refused before any work -------------------------------------------------------------------

def test_a_gguf_name_with_a_directory_format_is_one_line(qb, _pristine_llama, written,
                                                         tmp_path, no_work):
    for source, args in ((_pristine_llama, ("-b", "8", "-g", "32")),
                         (_pristine_llama, ("--format", "dense", *Q8)),
                         (written / "q8.gguf", ())):  # a GGUF back to a checkpoint (a folder)
        assert_refused(qb("convert", source, "-o", tmp_path / "x.gguf", *args),
                       "x.gguf names a GGUF file", "--format gguf", "without .gguf")
    assert_no_leftovers(tmp_path, keep=("cache", "store"))


def _foreign_gguf(path: Path) -> None:
    path.write_bytes(b"GGUF" + b"\0" * 60)  # another tool's file (only the magic matters)


def test_overwrite_rules_for_a_file(qb, _pristine_llama, written, tmp_path):
    out = tmp_path / "m.gguf"
    _foreign_gguf(out)
    assert_refused(qb("convert", _pristine_llama, "-o", out, *Q8), "already exists",
                   "--overwrite")
    result = qb("convert", _pristine_llama, "-o", out, "--overwrite", *Q8)  # the user's own GGUF
    assert result.code == 0, result.stderr
    assert out.read_bytes() == (written / "q8.gguf").read_bytes()
    assert_refused(qb("convert", _pristine_llama, "-o", out, *Q8), "already exists")
    assert qb("convert", _pristine_llama, "-o", out, "--overwrite", *Q8).code == 0  # ours
    assert_no_leftovers(tmp_path, keep=("cache", "store", "m.gguf", "m.gguf.quantbench.json"))


def _text_file(out: Path) -> str:
    out.write_text("my notes")
    return "not a GGUF file"


def _folder(out: Path) -> str:
    (out / "old").mkdir(parents=True)
    return "is a directory"


def _sidecar_held(out: Path) -> str:
    sidecar(out).write_text(json.dumps({"tool": {"name": "other"}, "files": {}}))
    return "is not quantbench's manifest of x.gguf"


def _sidecar_folder(out: Path) -> str:
    sidecar(out).mkdir()
    return "is not quantbench's manifest of x.gguf"


def _sidecar_of_another(out: Path) -> str:
    _foreign_gguf(out)
    sidecar(out).write_text(json.dumps({"tool": {"name": "quantbench"},
                                        "files": {"other.gguf": {}}}))
    return "is not quantbench's manifest of x.gguf"


REFUSED = {"a text file": _text_file, "a folder": _folder, "a foreign sidecar": _sidecar_held,
           "a folder as sidecar": _sidecar_folder, "another file's sidecar": _sidecar_of_another}


@pytest.mark.parametrize("case", REFUSED)
def test_overwrite_never_replaces_what_is_not_a_gguf_output(qb, _pristine_llama, tmp_path,
                                                            no_work, case):
    out = tmp_path / "x.gguf"
    needle = REFUSED[case](out)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_refused(qb("convert", _pristine_llama, "-o", out, "--overwrite", *Q8), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_the_source_and_files_of_a_source_folder_are_never_replaced(qb, written, tmp_path,
                                                                    no_work):
    source = tmp_path / "in.gguf"
    shutil.copy(written / "q8.gguf", source)
    assert_refused(qb("convert", source, "-o", source, "--overwrite", *Q8), "is the source")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(written / "dir", ckpt)  # a folder holding a .gguf, used as the source
    assert_refused(qb("convert", ckpt, "-o", ckpt / "model.gguf", "--overwrite", *Q8),
                   "would replace model.gguf, a file of the source")


def test_beside_a_gguf_source_as_llama_quantize_writes(qb, written, tmp_path):
    """``quantbench convert in.gguf --type Q4_0 -o out.gguf``: the output beside its source."""
    source = tmp_path / "in.gguf"
    shutil.copy(written / "q8.gguf", source)
    result = qb("convert", source, "--type", "Q4_0", "-o", tmp_path / "out.gguf")
    assert result.code == 0, result.stderr
    assert manifest(tmp_path / "out.gguf")["source"]["id"] == str(source)
    assert source.read_bytes() == (written / "q8.gguf").read_bytes()


def test_a_report_never_replaces_the_sidecar(qb, _pristine_llama, tmp_path, no_work):
    out = tmp_path / "x.gguf"
    assert_refused(qb("convert", _pristine_llama, "-o", out, "--json",
                      sidecar(out), *Q8), "is a file of the output")


# -- side files, and what a run leaves when it stops ----------------------------------------------

def test_side_files_are_named_after_the_output_and_replaced_with_it(qb, _pristine_llama,
                                                                    tmp_path):
    out = tmp_path / "im.gguf"
    result = qb("convert", _pristine_llama, "-o", out, *IMATRIX)
    assert result.code == 0, result.stderr
    assert sorted(manifest(out)["files"]) == ["im.gguf", "im.gguf.imatrix.gguf"]
    assert qb("inspect", out).code == 0
    assert qb("convert", _pristine_llama, "-o", out, "--overwrite", *Q8).code == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("im")) == \
        ["im.gguf", "im.gguf.quantbench.json"]  # the previous run's imatrix went with it
    (tmp_path / "im.gguf.imatrix.gguf").write_bytes(b"the user's own")
    assert_refused(qb("convert", _pristine_llama, "-o", out, "--overwrite", *IMATRIX),
                   "im.gguf.imatrix.gguf exists and is not a file of the output")
    assert (tmp_path / "im.gguf.imatrix.gguf").read_bytes() == b"the user's own"
    assert sorted(manifest(out)["files"]) == ["im.gguf"]  # the previous output, untouched
    assert_no_leftovers(tmp_path, keep=("cache", "store", "im.gguf", "im.gguf.quantbench.json",
                                        "im.gguf.imatrix.gguf"))


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(qb, _pristine_llama, copy,
                                                                  monkeypatch):
    import gguf

    before = {p.name: p.read_bytes() for p in copy.parent.iterdir()}

    def write(self, *args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write)
    lines = qb("convert", _pristine_llama, "-o", copy, "--overwrite", *Q8).stderr
    assert "error: " in lines and "no space left" in lines.lower() and ".tmp-" not in lines
    assert {p.name: p.read_bytes() for p in copy.parent.iterdir()} == before


def test_killed_between_the_renames_the_next_run_finishes_the_install(qb, copy, _pristine_llama,
                                                                      tmp_path):
    """A kill after the GGUF is in place and before its sidecar: the previous sidecar no longer
    vouches for the file (refused by its sha256, never taken as verified); the next run for the
    output completes the install the dead run began."""
    from quantbench.formats.file_output import check_file_output
    from tests.faults.test_crash import kill_at

    env = {"QUANTBENCH_CACHE": str(tmp_path / "cache"), "QUANTBENCH_STORE": str(tmp_path / "s")}
    old = sidecar(copy).read_bytes()
    kill_at("install-file", "convert", _pristine_llama, "-o", copy, "--overwrite",
            "--type", "Q4_0", env=env)
    assert sidecar(copy).read_bytes() == old  # the GGUF is new, its sidecar still the old one
    assert_refused(qb("inspect", copy), "q8.gguf not as q8.gguf.quantbench.json records")
    with pytest.raises(Exception, match="already exists"):
        check_file_output(copy)  # settles the dead run's staging folder first
    assert manifest(copy)["quantize"]["grid"]["type"] == "Q4_0"
    assert qb("inspect", copy).code == 0
    assert_no_leftovers(copy.parent, keep=("q8.gguf", "q8.gguf.quantbench.json"))
