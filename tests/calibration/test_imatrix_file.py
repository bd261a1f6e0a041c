"""llama.cpp imatrix files (GGUF and legacy .dat): round trips, llama-quantize's importance,
atomic writes and one-line errors for files that are not imatrix files. (Byte-for-byte equality
with llama-imatrix's own files is in tests/formats/test_gguf_imatrix.py.)"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from quantbench.calibration.imatrix_file import (ImatrixEntry, load_imatrix, read_imatrix,
                                                 write_imatrix)
from quantbench.errors import ConfigError, FormatError


def stats() -> dict[str, tuple[torch.Tensor, torch.Tensor | int]]:
    torch.manual_seed(0)
    return {"blk.0.attn_q.weight": (torch.rand(256) * 300, 640),
            "blk.0.ffn_down.weight": (torch.rand(512) * 7, 640),
            # an MoE weight: one row of sums per expert, the second never routed to
            "blk.1.ffn_up_exps.weight": (torch.rand(3, 64), torch.tensor([200, 0, 440]))}


def expected_importance(sums, counts) -> np.ndarray:
    """llama-quantize's load_imatrix: float32 sums / float32 count, 1 where nothing was seen."""
    s = np.asarray(sums, dtype=np.float32).reshape(len(np.atleast_1d(counts)), -1)
    c = np.asarray(np.atleast_1d(counts), dtype=np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(c > 0, s / np.where(c > 0, c, 1), np.float32(1)).reshape(-1)


def test_gguf_round_trip_keeps_sums_counts_and_metadata(tmp_path):
    path = write_imatrix(tmp_path / "imatrix.gguf", stats(), datasets=["a.txt", "b.txt"],
                         chunk_count=5, chunk_size=128)
    im = load_imatrix(path)
    assert not im.legacy and im.datasets == ("a.txt", "b.txt")
    assert (im.chunk_count, im.chunk_size) == (5, 128)
    importance = read_imatrix(path)
    for name, (sums, counts) in stats().items():
        e = im.entries[name]
        assert torch.equal(e.sums.reshape(-1), sums.reshape(-1).float())
        assert e.counts.tolist() == torch.as_tensor(counts).reshape(-1).tolist()
        assert np.array_equal(importance[name].numpy(), expected_importance(sums, counts))
    reader = gguf.GGUFReader(str(path))  # llama.cpp's Python reader sees its own layout
    assert reader.fields["general.type"].contents() == "imatrix"
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight.in_sum2"] == [256]
    assert shapes["blk.0.attn_q.weight.counts"] == [1]
    assert shapes["blk.1.ffn_up_exps.weight.in_sum2"] == [64, 3]
    assert shapes["blk.1.ffn_up_exps.weight.counts"] == [1, 3]
    assert [t.name for t in reader.tensors][::2] == [n + ".in_sum2" for n in sorted(stats())]


def test_legacy_round_trip(tmp_path):
    """.dat stores (sum / count) · ncall with ncall = rows in chunks, rounded up."""
    path = write_imatrix(tmp_path / "imatrix.dat", stats(), datasets=["a.txt", "b.txt"],
                         chunk_count=5, chunk_size=128, legacy=True)
    im = load_imatrix(path)
    assert im.legacy and im.datasets == ("b.txt",) and im.chunk_count == 5
    assert im.entries["blk.0.attn_q.weight"].counts.tolist() == [5]     # 640 / 128
    assert im.entries["blk.1.ffn_up_exps.weight"].counts.tolist() == [4]  # ceil(440 / 128)
    for name, (sums, counts) in stats().items():
        np.testing.assert_allclose(im.entries[name].importance().numpy(),
                                   expected_importance(sums, counts), rtol=1e-6)


def test_importance_is_llama_quantize_float32_division():
    sums = torch.tensor([[1.0, 2.0, 3.0e-8, 7.0]])
    entry = ImatrixEntry.of(sums, 3)
    assert np.array_equal(entry.importance().numpy(), sums.numpy()[0] / np.float32(3))
    assert entry.importance().dtype == torch.float32


def test_write_is_atomic_and_refuses_what_llama_cpp_cannot_read(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(ConfigError, match="needs chunk_size"):
        write_imatrix(folder / "x.dat", stats(), legacy=True)
    with pytest.raises(ConfigError, match="at least one entry"):
        write_imatrix(folder / "x.gguf", {})
    with pytest.raises(ConfigError, match="n_mat counts"):
        write_imatrix(folder / "x.gguf", {"a.weight": (torch.ones(2, 8), 5)})
    with pytest.raises(ConfigError, match="is a directory"):
        write_imatrix(folder, stats())
    assert not list(folder.iterdir())
    target = write_imatrix(folder / "x.gguf", stats(), datasets=["a"])
    before = target.read_bytes()

    def fail(*args):
        raise OSError("disk full")
    monkeypatch.setattr("quantbench.formats.manifest.os.replace", fail)
    with pytest.raises(ConfigError, match="disk full"):
        write_imatrix(target, {"b.weight": (torch.ones(8), 1)})
    assert target.read_bytes() == before and [p.name for p in folder.iterdir()] == ["x.gguf"]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_truncated_corrupt_and_unknown_files(tmp_path):
    good = write_imatrix(tmp_path / "good.gguf", stats(), datasets=["a"], chunk_count=1,
                         chunk_size=640).read_bytes()
    dat = write_imatrix(tmp_path / "good.dat", stats(), datasets=["a"], chunk_count=1,
                        chunk_size=640, legacy=True).read_bytes()
    cases = {
        "cut.gguf": (good[: len(good) - 700], "truncated or corrupted"),
        "head.gguf": (good[:40], "truncated or corrupted"),
        "cut.dat": (dat[:100], "is truncated"),
        "text.txt": (b"hello, this is not an imatrix\n" * 10, "not a llama.cpp imatrix file"),
        "empty.dat": (b"", "not a llama.cpp imatrix file"),
        "noise.bin": (bytes(range(256)) * 4, "not a llama.cpp imatrix file"),
    }
    for name, (data, match) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(FormatError, match=match) as exc:
            load_imatrix(tmp_path / name)
        assert name in _one_line(exc)
    with pytest.raises(FormatError, match="does not exist"):
        load_imatrix(tmp_path / "missing.gguf")


def test_gguf_that_is_not_an_imatrix(tmp_path):
    """A model GGUF, a file with sums but no counts, and non-finite sums are refused."""
    def gguf_file(name, tensors, general_type="model"):
        writer = gguf.GGUFWriter(str(tmp_path / name), "llama")
        writer.add_type(general_type)
        for tname, array in tensors.items():
            writer.add_tensor(tname, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return tmp_path / name

    ones = np.ones(32, dtype=np.float32)
    with pytest.raises(FormatError, match="is a model file without imatrix entries"):
        load_imatrix(gguf_file("model.gguf", {"blk.0.attn_q.weight": ones}))
    with pytest.raises(FormatError, match="has sums but not the other"):
        load_imatrix(gguf_file("half.gguf", {"blk.0.attn_q.weight.in_sum2": ones}, "imatrix"))
    bad = ones.copy()
    bad[3] = np.nan
    with pytest.raises(FormatError, match="NaN"):
        load_imatrix(gguf_file("nan.gguf", {"x.weight.in_sum2": bad,
                                            "x.weight.counts": np.ones(1, np.float32)},
                               "imatrix"))
