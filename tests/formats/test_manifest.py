"""``atomic_write``: the one way quantbench replaces a file (JSON reports, eval caches, plots,
imatrix files) — all or nothing, unique temporary names, parent folders created."""
from __future__ import annotations

import json

import pytest

from quantbench.formats.manifest import atomic_write, write_json_atomic


def test_atomic_write_replaces_whole_file_and_creates_parent(tmp_path):
    target = tmp_path / "new" / "deeper" / "out.bin"
    with atomic_write(target) as fh:
        fh.write(b"abc")
        assert not target.exists()  # nothing visible until the write is complete
    assert target.read_bytes() == b"abc"
    with atomic_write(target) as fh:
        fh.write(b"xyz!")
    assert target.read_bytes() == b"xyz!"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_atomic_write_failure_keeps_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target, "w") as fh:
            fh.write('{"half": ')
            raise RuntimeError("boom")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_concurrent_writers_use_distinct_temporaries(tmp_path):
    target = tmp_path / "cache.npy"
    with atomic_write(target) as first, atomic_write(target) as second:
        assert first.name != second.name
        first.write(b"1")
        second.write(b"2")
    assert target.read_bytes() == b"1"  # the outer (last to finish) writer wins, whole
