"""Class 6 (outputs): a full disk, an exceeded quota, a refused or read-only write is one line
naming the path and what to do, never an "internal error", and leaves no partial output.

When the output's size is known before any work (convert: the grid's width over the weights),
too little free space is refused up front ("needs about X at PATH, Y free"). Errors are
injected where each writer writes (a shard, the GGUF stream, the manifest, the result store,
with the error types each raises: ``OSError`` with an errno, numpy's errno-less short write,
safetensors' Rust error); where this machine lets the tests mount a small tmpfs, a real full
disk and a read-only file system are tried too.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import re
import shutil
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest

from tests.faults.conftest import Result, assert_no_leftovers, assert_refused

ABSMAX = ("-m", "absmax", "-b", "8", "-g", "32")
Q8 = ("-t", "Q8_0")


def refused(result: Result, *needles: str) -> str:
    """``assert_refused`` on what the user sees once the progress bar's last frame (printed
    when a write fails mid-way) is set aside."""
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and not re.search(r"\d+/\d+ .*eta", line)]
    return assert_refused(Result(result.code, result.stdout, "\n".join(lines)), *needles)


@pytest.fixture
def place(tmp_path, monkeypatch, _pristine_llama):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QUANTBENCH_STORE", str(tmp_path / "store"))
    return tmp_path, _pristine_llama


def assert_clean(tmp_path: Path, keep: tuple[str, ...] = ()) -> None:
    """No output, no temporary beside it, no result store left (a result's store lives as
    long as the result object: in-process, until it is collected; a CLI process removes it
    when it exits)."""
    gc.collect()
    assert_no_leftovers(tmp_path, keep=("cache", "store", *keep))
    assert_no_leftovers(tmp_path / "store")


# -- injected errors, where each writer writes ------------------------------------------------

ERRORS = {
    "ENOSPC": (lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "no space left"),
    "EDQUOT": (lambda: OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), "quota"),
    "EACCES": (lambda: PermissionError(errno.EACCES, os.strerror(errno.EACCES)),
               "permission denied"),
    "EPERM": (lambda: PermissionError(errno.EPERM, os.strerror(errno.EPERM)),
              "permission denied"),
    "EROFS": (lambda: OSError(errno.EROFS, os.strerror(errno.EROFS)), "read-only"),
    "short write": (lambda: OSError("4096 requested and 1024 written"), "no space left"),
}


def _in_shard(monkeypatch, make):
    from quantbench.formats import io

    def flush(self):
        raise make()
    monkeypatch.setattr(io.ShardedWriter, "_flush", flush)
    return ABSMAX


def _in_gguf_stream(monkeypatch, make):
    import gguf

    calls = []

    def write(self, tensor, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # some tensors are on disk already
            raise make()
        return real(self, tensor, *args, **kwargs)
    real = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write)
    return Q8


def _in_manifest(monkeypatch, make):
    from quantbench.formats import manifest

    real_atomic_write = manifest.atomic_write

    @contextlib.contextmanager
    def failing(path, mode="wb"):  # the JSON file's bytes cannot be written
        with real_atomic_write(path, mode) as fh:
            fh.write(b"{" if "b" in mode else "{")
            raise make()
            yield fh
    monkeypatch.setattr(manifest, "atomic_write", failing)
    return ABSMAX


def _in_gguf_manifest(monkeypatch, make):
    _in_manifest(monkeypatch, make)
    return Q8


WHERE = {"shard": _in_shard, "gguf stream": _in_gguf_stream, "manifest": _in_manifest,
         "gguf manifest": _in_gguf_manifest}


@pytest.mark.parametrize("where, kind, name", [
    ("shard", "ENOSPC", "out"), ("shard", "EACCES", "out"), ("shard", "short write", "out"),
    ("gguf stream", "short write", "out"), ("gguf stream", "EDQUOT", "out"),
    ("gguf stream", "EROFS", "out"), ("manifest", "ENOSPC", "out"),
    ("manifest", "EPERM", "out"), ("manifest", "EROFS", "out"),
    ("gguf stream", "ENOSPC", "out.gguf"), ("gguf manifest", "EDQUOT", "out.gguf")])
def test_write_errors_are_one_line_and_leave_nothing(qb, place, monkeypatch, where, kind, name):
    tmp_path, source = place
    make, needle = ERRORS[kind]
    flags = WHERE[where](monkeypatch, make)
    out = tmp_path / name
    line = refused(qb("convert", source, "-o", out, *flags), needle, str(out))
    assert "choose" in line or "free" in line  # what to do
    assert ".tmp-" not in line  # the user's path, not the hidden temporary's
    assert_clean(tmp_path)


def test_a_failed_write_keeps_the_previous_output(qb, place, monkeypatch):
    tmp_path, source = place
    out = tmp_path / "out"
    assert qb("convert", source, "-o", out, "-m", "absmax", "-b", "4", "-g", "32").code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _in_shard(monkeypatch, ERRORS["ENOSPC"][0])
    refused(qb("convert", source, "-o", out, "--overwrite", *ABSMAX), "no space left")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert_no_leftovers(tmp_path, keep=("cache", "store", "out"))


@pytest.mark.parametrize("message", [
    "Error while serializing: I/O error: No space left on device (os error 28)",
    "Error while serializing: I/O error: Disk quota exceeded (os error 122)"])
def test_a_full_result_store_names_it(qb, place, monkeypatch, message):
    import safetensors.torch  # the store imports save_file from it when it writes a block

    tmp_path, source = place

    def save_file(*args, **kwargs):
        raise RuntimeError(message)  # safetensors' own error type carries no errno
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    refused(qb("convert", source, "-o", tmp_path / "out", *ABSMAX), "QUANTBENCH_STORE",
            str(tmp_path / "store"))
    assert_clean(tmp_path)


def test_a_json_report_that_cannot_be_written_is_one_line(qb, place, monkeypatch):
    tmp_path, source = place
    out = tmp_path / "out"
    assert qb("convert", source, "-o", out, *ABSMAX).code == 0
    _in_manifest(monkeypatch, ERRORS["ENOSPC"][0])
    refused(qb("inspect", out, "--json", tmp_path / "i.json"), "no space left", "i.json")
    assert not (tmp_path / "i.json").exists()
    assert_no_leftovers(tmp_path, keep=("cache", "store", "out"))


# -- free space checked before any work --------------------------------------------------------

Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def little_space(monkeypatch):
    """Every disk has 50 kB free; quantizing anything fails the test."""
    import quantbench.diskspace as diskspace
    from quantbench.quant.run import QuantizedModel

    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda path: Usage(10**9, 10**9, 50_000))

    def forbidden(*args, **kwargs):
        raise AssertionError("quantized before checking the space")
    monkeypatch.setattr(QuantizedModel, "run", forbidden)


@pytest.mark.parametrize("flags, name", [
    (ABSMAX, "out"), (Q8, "out"), (("-m", "nf4"), "out"),
    (("-m", "zeropoint", "-b", "4", "-g", "32"), "out"), (Q8, "out.gguf")],
    ids=["int8", "gguf-q8", "nf4", "int4", "gguf-file"])
def test_too_little_free_space_is_refused_before_any_work(qb, place, little_space, flags, name):
    tmp_path, source = place
    line = refused(qb("convert", source, "-o", tmp_path / name, *flags), "needs about",
                   "50.0 kB free", str(tmp_path))
    number, unit = line.split("needs about ")[1].split()[:2]
    assert float(number) * {"kB": 1e3, "MB": 1e6}[unit] > 50_000  # about what it takes
    assert_clean(tmp_path)


def test_the_estimate_is_close_to_the_written_size(place):
    import quantbench as qb_api
    from quantbench.formats.outputs import estimate_output_bytes
    from quantbench.registry import get_format

    tmp_path, source = place
    for method, bits, fmt in (("absmax", 8, "dense"), ("zeropoint", 4, "dense"),
                              ("nf4", None, "bitsandbytes")):
        q = qb_api.quantize(str(source), method=method, bits=bits, group_size=32)
        out = qb_api.save(q, tmp_path / f"{method}{bits}", format=fmt)
        written = sum(p.stat().st_size for p in out.iterdir() if p.name != "quantbench.json")
        ratio = estimate_output_bytes(q, get_format(fmt)()) / written
        assert 0.7 < ratio < 1.3, (method, fmt, ratio)


# -- a real small disk and a read-only one (where this machine lets the test mount them) ------

def _mount(path: Path, *options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")


@pytest.fixture
def small_disk(tmp_path):
    """A 96 kB tmpfs at ``tmp_path/disk`` (skipped where mounting is not allowed)."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    _mount(disk, "size=96k")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_real_full_disk_is_refused_up_front(qb, place, small_disk):
    tmp_path, source = place
    refused(qb("convert", source, "-o", small_disk / "out", *ABSMAX), "needs about",
            str(small_disk))
    assert list(small_disk.iterdir()) == []


@pytest.mark.parametrize("flags", [ABSMAX, Q8], ids=["safetensors", "gguf"])
def test_a_real_disk_filling_up_mid_write_is_one_line(qb, place, small_disk, monkeypatch,
                                                      flags):
    """The estimate missed (another writer took the space meanwhile): the write itself hits
    ENOSPC, or numpy's short write, and says so; the small disk is left empty."""
    import quantbench.formats.io as io

    tmp_path, source = place
    monkeypatch.setattr(io, "check_output_space", lambda *args: None)
    import quantbench.formats.outputs as outputs
    monkeypatch.setattr(outputs, "check_output_space", lambda *args: None)
    refused(qb("convert", source, "-o", small_disk / "out", *flags), "no space left",
            str(small_disk / "out"))
    assert list(small_disk.iterdir()) == []
    assert_clean(tmp_path, keep=("disk",))


def test_a_full_store_disk_is_one_line(qb, place, small_disk, monkeypatch):
    tmp_path, source = place
    monkeypatch.setenv("QUANTBENCH_STORE", str(small_disk))
    (small_disk / "filler").write_bytes(b"\0" * 90_000)
    refused(qb("convert", source, "-o", tmp_path / "out", *ABSMAX), "QUANTBENCH_STORE")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]
    assert_no_leftovers(tmp_path, keep=("cache", "disk"))


def test_a_gguf_import_into_a_full_cache_is_one_line(qb, place, small_disk, monkeypatch):
    tmp_path, source = place
    assert qb("convert", source, "-o", tmp_path / "g", "-t", "Q8_0").code == 0
    monkeypatch.setenv("QUANTBENCH_CACHE", str(small_disk))
    refused(qb("convert", tmp_path / "g" / "model.gguf", "-o", tmp_path / "hf"),
            "no space left", "QUANTBENCH_CACHE", "needs about")
    assert [p.name for p in (small_disk / "gguf").iterdir()] == []
    assert not (tmp_path / "hf").exists()


def test_a_read_only_output_folder_is_refused_up_front(qb, place, small_disk):
    tmp_path, source = place
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    refused(qb("convert", source, "-o", small_disk / "out", *ABSMAX), "cannot write",
            str(small_disk))
    refused(qb("inspect", source, "--json", small_disk / "i.json"), "not writable")
    assert list(small_disk.iterdir()) == []


def test_a_folder_without_write_permission_is_refused_up_front(qb, place):
    tmp_path, source = place
    if os.geteuid() == 0:
        pytest.skip("root writes through chmod 0o500 (the read-only tmpfs test covers it)")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        refused(qb("convert", source, "-o", locked / "out", *ABSMAX), "cannot write",
                str(locked))
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_a_baseline_cache_that_cannot_be_written_costs_a_warning_only(tmp_path, monkeypatch,
                                                                      caplog):
    import torch

    from quantbench.eval import evaluator
    from quantbench.eval.protocol import EvalProtocol
    from quantbench.formats import manifest

    _in_manifest(monkeypatch, lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    result = evaluator.BaselineResult(ppl=10.0, n_tokens=4, seconds=0.1)
    evaluator._store_cache(tmp_path, "key", torch.ones(4), result, EvalProtocol())
    assert "baseline not cached" in caplog.text and "no space left" in caplog.text
    assert evaluator._load_cache(tmp_path, "key") is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_manifest_of_a_failed_run_is_never_half_written(place):
    """The manifest rewrite of ``record_eval`` on a full disk keeps the old manifest whole."""
    import quantbench as qb_api
    from quantbench.errors import QuantbenchError
    from quantbench.formats import manifest

    tmp_path, source = place
    out = qb_api.save(qb_api.quantize(str(source), method="absmax", bits=8, group_size=32),
                      tmp_path / "out")
    before = (out / "quantbench.json").read_bytes()

    real_atomic_write = manifest.atomic_write

    @contextlib.contextmanager
    def half_written(path, mode="wb"):
        with real_atomic_write(path, mode) as fh:
            fh.write('{"half": ')
            yield fh
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    manifest.atomic_write = half_written
    try:
        with pytest.raises(QuantbenchError, match="no space left"):
            manifest.record_eval(out, {"ppl": 1.0})
    finally:
        manifest.atomic_write = real_atomic_write
    assert (out / "quantbench.json").read_bytes() == before
    assert json.loads(before)["eval"] is None
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("."))  == []
