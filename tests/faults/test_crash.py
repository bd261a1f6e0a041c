"""Class 5: a run killed with ``kill -9`` at any point leaves the previous output intact, and
the next run removes what the killed one left and writes the same bytes as a run never cut.

Each case starts ``quantbench convert`` in its own process with ``QUANTBENCH_FAILPOINT`` naming
a moment (:mod:`quantbench.faults`): while a calibrated method quantizes, while a shard is
written, between the renames that replace an existing output (atomic exchange, and the
two-rename fallback), while a GGUF is imported into the cache, while a Q8_0 GGUF is written.
The process prints a marker there and sleeps; the test kills it, checks what is on disk, reruns
the command in-process and compares sha256 of every file (the manifest without its timestamps
and timings) with an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantbench.faults import ENV, MARKER

ABSMAX = ("-m", "absmax", "-b", "8", "-g", "32")
ABSMAX4 = ("-m", "absmax", "-b", "4", "-g", "32")
GPTQ = ("-m", "gptq", "-b", "4", "-g", "32", "--calib-samples", "2", "--calib-len", "32")
Q8 = ("-t", "Q8_0")
NO_EXCHANGE = ("import sys, quantbench.tempfiles as t; t.exchange = lambda a, b: False; "
               "from quantbench.cli import main; main(sys.argv[1:])")
VOLATILE = ("quantize_seconds", "write_seconds")


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file in an output (a folder, or ``NAME.gguf`` and the files beside it
    named after it); the manifest's timestamps and timings left out."""
    folder = Path(folder)
    files = sorted(folder.iterdir()) if folder.is_dir() else \
        sorted(p for p in folder.parent.iterdir() if p.name.startswith(folder.name))
    found = {}
    for path in files:
        data = path.read_bytes()
        if path.name.endswith("quantbench.json"):
            manifest = json.loads(data)
            manifest.pop("created")
            for key in VOLATILE:
                manifest.get("summary", {}).pop(key, None)
            data = json.dumps(manifest, sort_keys=True).encode()
        found[path.name] = hashlib.sha256(data).hexdigest()
    return found


def kill_at(point: str, *args, env: dict[str, str], code: str | None = None) -> None:
    """Run the CLI in a new process until it reaches failpoint ``point``, then ``kill -9`` it."""
    runner = ["-c", code] if code else ["-m", "quantbench.cli"]
    log = Path(env["QUANTBENCH_CACHE"]).parent / f"stderr-{point}.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, *runner, *map(str, args)],
                                stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, **env, ENV: point, "COLUMNS": "400"})
    try:
        deadline = time.monotonic() + 60
        while MARKER not in log.read_text():
            assert proc.poll() is None, f"ended before {point}: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"never reached {point}"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        log.unlink()


def leftovers(*folders: Path) -> list[str]:
    """Temporaries (hidden ``.NAME.tmp-/.old-/.build-`` names, store folders) in ``folders``."""
    found = []
    for folder in folders:
        if Path(folder).is_dir():
            found += [f"{folder}/{p.name}" for p in Path(folder).iterdir()
                      if p.name.startswith(".") or p.name.startswith("result-")]
    return found


@pytest.fixture
def place(tmp_path, monkeypatch, _pristine_llama):
    """A source, an isolated cache and store, the same for the killed process and reruns."""
    env = {"QUANTBENCH_CACHE": str(tmp_path / "cache"), "QUANTBENCH_STORE": str(tmp_path / "store")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return tmp_path, _pristine_llama, env


def reference(qb, tmp_path: Path, source: Path, flags: tuple[str, ...],
              name: str = "out") -> dict[str, str]:
    """The snapshot of an uninterrupted run of the command (the manifest records it), moved
    aside to ``ref`` (``name``: the output, ``out.gguf`` for a GGUF written as one file)."""
    out = tmp_path / name
    assert qb("convert", source, "-o", out, "--overwrite", *flags).code == 0
    snap = snapshot(out)
    ref = tmp_path / "ref"
    ref.mkdir(exist_ok=True)
    for path in ([out] if out.is_dir() else list(tmp_path.glob(f"{name}*"))):
        path.rename(ref / path.name)
    return snap


@pytest.mark.parametrize("point, flags, previous, name", [
    ("store-block-2", GPTQ, ABSMAX4, "out"),       # calibrating/quantizing, an older output
    ("store-block-1", ABSMAX, None, "out"),        # quantizing a first output
    ("write-shard", ABSMAX, ABSMAX4, "out"),       # a shard is written over an older output
    ("write-block", Q8, ABSMAX, "out"),            # a Q8_0 GGUF is half written over an older one
    ("write-block", Q8, ("-t", "Q4_0"), "out.gguf"),  # the same, written as one file
], ids=["calibrating", "quantizing", "write-shard", "gguf-q8-write", "gguf-file-write"])
def test_killed_convert_keeps_previous_output_and_rerun_is_identical(qb, place, point, flags,
                                                                     previous, name):
    tmp_path, source, env = place
    expected = reference(qb, tmp_path, source, flags, name)
    out = tmp_path / name
    before = None
    if previous:
        assert qb("convert", source, "-o", out, *previous).code == 0
        before = snapshot(out)
    kill_at(point, "convert", source, "-o", out, "--overwrite", *flags, env=env)
    assert leftovers(tmp_path, tmp_path / "store"), "the failpoint was not mid-run"
    if previous:
        assert snapshot(out) == before  # the previous output, byte for byte
    else:
        assert not out.exists()
    result = qb("convert", source, "-o", out, "--overwrite", *flags)
    assert result.code == 0, result.stderr
    assert snapshot(out) == expected
    assert not leftovers(tmp_path, tmp_path / "store")


def test_killed_while_replacing_an_output_never_loses_it(qb, place):
    """Atomic exchange: the output is the old one or the new one, whole, at every moment."""
    from quantbench import tempfiles

    tmp_path, source, env = place
    probe_a, probe_b = tmp_path / "a", tmp_path / "b"
    probe_a.mkdir(), probe_b.mkdir()
    if not tempfiles.exchange(probe_a, probe_b):
        pytest.skip("no atomic exchange on this system (the fallback is tested below)")
    probe_a.rmdir(), probe_b.rmdir()
    expected = reference(qb, tmp_path, source, ABSMAX)
    out = tmp_path / "out"
    assert qb("convert", source, "-o", out, *ABSMAX4).code == 0
    kill_at("replace-output", "convert", source, "-o", out, "--overwrite", *ABSMAX, env=env)
    assert snapshot(out) == expected  # swapped in whole; the old one waits in a temporary
    assert leftovers(tmp_path)
    assert qb("convert", source, "-o", out, "--overwrite", *ABSMAX).code == 0
    assert snapshot(out) == expected
    assert not leftovers(tmp_path, tmp_path / "store")


def test_killed_between_the_two_renames_the_next_run_restores_the_previous_output(qb, place):
    """Without atomic exchange, a kill between ``out → .out.old-*`` and ``tmp → out`` leaves no
    output for a moment; the next run for it puts the previous one back first."""
    from quantbench.formats.outputs import check_output

    tmp_path, source, env = place
    expected = reference(qb, tmp_path, source, ABSMAX)
    out = tmp_path / "out"
    assert qb("convert", source, "-o", out, *ABSMAX4).code == 0
    before = snapshot(out)
    kill_at("replace-output", "convert", source, "-o", out, "--overwrite", *ABSMAX, env=env,
            code=NO_EXCHANGE)
    assert not out.exists() and any(".out.old-" in p for p in leftovers(tmp_path))
    with pytest.raises(Exception, match="already exists"):  # restored, so it needs --overwrite
        check_output(out)
    assert snapshot(out) == before
    assert qb("convert", source, "-o", out, "--overwrite", *ABSMAX).code == 0
    assert snapshot(out) == expected
    assert not leftovers(tmp_path, tmp_path / "store")


def test_killed_gguf_import_leaves_no_cache_entry_and_rerun_is_identical(qb, place, monkeypatch):
    tmp_path, source, env = place
    assert qb("convert", source, "-o", tmp_path / "g", *Q8).code == 0
    gguf = tmp_path / "m.gguf"
    (tmp_path / "g" / "model.gguf").rename(gguf)
    expected = reference(qb, tmp_path, gguf, ())  # imports into the cache
    cache = tmp_path / "cache" / "gguf"
    for entry in cache.iterdir():  # a fresh cache for the killed import
        os.rename(entry, tmp_path / f"imported-{entry.name}")
    out = tmp_path / "out"
    kill_at("import-gguf", "convert", gguf, "-o", out, "--overwrite", env=env)
    assert not out.exists()
    assert [p.name for p in cache.iterdir()] and \
        all(p.name.startswith(".") for p in cache.iterdir())  # only the dead build
    result = qb("convert", gguf, "-o", out, "--overwrite")
    assert result.code == 0, result.stderr
    assert snapshot(out) == expected
    assert not leftovers(cache, tmp_path, tmp_path / "store")
    # the converted GGUF carries a manifest: a rerun's --overwrite knows it as quantbench's
    assert qb("convert", gguf, "-o", out, "--overwrite").code == 0
    assert snapshot(out) == expected


# -- the helper that names temporaries -------------------------------------------------------

def _dead_process() -> tuple[int, str]:
    """The pid and start time of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "from quantbench.tempfiles import owner_tag; "
                           "print(owner_tag())"], capture_output=True, text=True, check=True)
    pid, _, start = proc.stdout.strip().partition(".")
    return int(pid), start


def test_only_temporaries_of_dead_owners_are_swept(tmp_path):
    from quantbench import tempfiles

    pid, start = _dead_process()
    mine = tempfiles.make_dir(tmp_path, ".out.tmp-")
    dead = tmp_path / f".out.tmp-{pid}.{start}-abcd1234"
    legacy_dead = tmp_path / f".out.tmp-{pid}-abcd1234"  # a pid without start time
    recycled = tmp_path / f".out.tmp-{os.getpid()}.1-abcd1234"  # our pid, another start
    foreign = [tmp_path / ".out.tmp-notes", tmp_path / f".out.tmp-{pid}", tmp_path / "out",
               tmp_path / f".other.tmp-{pid}.{start}-abcd1234"]
    for path in (dead, legacy_dead, recycled, *foreign):
        path.mkdir()
    removed = tempfiles.sweep(tmp_path, ".out.tmp-")
    assert sorted(removed) == sorted([dead, legacy_dead, recycled])
    assert mine.is_dir() and all(p.is_dir() for p in foreign)


def test_exchange_swaps_or_says_it_cannot(tmp_path):
    from quantbench import tempfiles

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    if not tempfiles.exchange(a, b):
        assert (a / "x").read_text() == "a"  # nothing moved; the caller renames instead
        return
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
    with pytest.raises(OSError):
        tempfiles.exchange(a, tmp_path / "missing")
