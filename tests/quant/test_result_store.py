"""``quantize()`` means done: the result is kept (one block in memory, the rest on disk), so
saving it in several formats calibrates and quantizes once, with the same bytes as separate
runs."""
from __future__ import annotations

import hashlib
import gc

import torch

import quantbench as qb
from quantbench.calibration import pipeline
from quantbench.config import CodebookGridConfig, GGUFGridConfig, IntGridConfig
from quantbench.quant.store import BlockStore
from quantbench.tensor import QuantizedTensor

CALIB = {"calib_samples": 4, "calib_len": 64}


def _digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_second_save_reuses_the_result(tiny_llama, tmp_path, monkeypatch):
    runs = []
    real = pipeline.run_pipeline

    def counted(*args, **kwargs):
        runs.append(1)
        yield from real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run_pipeline", counted)
    q = qb.quantize(str(tiny_llama), method="gptq", bits=4, group_size=32, **CALIB)
    assert q.done and len(runs) == 1
    a = qb.save(q, tmp_path / "gptq", format="gptq")
    b = qb.save(q, tmp_path / "ct", format="compressed-tensors")
    c = qb.save(q, tmp_path / "dense", format="dense")
    assert len(runs) == 1, "a second save calibrated again"
    fresh = qb.quantize(str(tiny_llama), method="gptq", bits=4, group_size=32, **CALIB)
    assert _digest(b) == _digest(qb.save(fresh, tmp_path / "ct2",
                                         format="compressed-tensors"))
    assert all(p.is_dir() for p in (a, c))


def test_store_round_trips_every_part(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(64, 96, dtype=torch.float16)
    from quantbench.quant.methods.rtn import rtn_quantize

    int_qt = rtn_quantize(w, IntGridConfig(4, False, "group", 32), torch.float16)
    int_qt.perm = torch.randperm(96).to(torch.int32)
    int_qt.g_idx = (torch.arange(96) // 32).to(torch.int32)
    int_qt.meta = {"gptq_damp": 0.01, "note": "x"}
    codebook = QuantizedTensor(codes=torch.randint(0, 16, (64, 96), dtype=torch.uint8),
                               scales=torch.randint(0, 255, (1, 96), dtype=torch.uint8),
                               zeros=None, grid=CodebookGridConfig("nf4", 64, True),
                               aux={"nested_absmax": torch.rand(1),
                                    "nested_offset": torch.tensor(0.5)})
    gguf = QuantizedTensor(codes=torch.randint(0, 255, (4, 34), dtype=torch.uint8),
                           scales=torch.empty(0), zeros=None, grid=GGUFGridConfig("Q8_0"),
                           dtype=torch.bfloat16)
    store = BlockStore(tmp_path / "store")
    plain = torch.randn(8)
    store.add("block 0", {"a": int_qt, "b": codebook, "c": gguf, "d": plain})
    [(label, back)] = list(store)
    assert label == "block 0"
    for name, qt in (("a", int_qt), ("b", codebook), ("c", gguf)):
        assert back[name].equal(qt) and back[name].dtype == qt.dtype
        assert back[name].meta == qt.meta
    assert torch.equal(back["a"].perm, int_qt.perm) and torch.equal(back["d"], plain)
    directory = store.directory
    del store, back
    gc.collect()
    assert not directory.exists()


def test_store_lives_on_disk_and_orphans_are_removed(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from quantbench.quant.store import PREFIX, store_root

    monkeypatch.setenv("QUANTBENCH_STORE", str(tmp_path / "stores"))
    assert store_root() == tmp_path / "stores"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    orphan = tmp_path / "stores" / f"{PREFIX}{dead}-abc"
    orphan.mkdir(parents=True)
    live = tmp_path / "stores" / f"{PREFIX}{os.getpid()}-other"
    live.mkdir()
    store = BlockStore()
    assert store.directory.parent == tmp_path / "stores"
    assert not orphan.exists() and live.exists()
    store.close()
    assert not store.directory.exists()
