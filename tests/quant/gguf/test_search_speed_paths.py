"""The fast paths of the GGUF searches equal the plain C-order code they replace: numpy's
row-by-row ``add.reduce``, ``first_abs_max`` from max/min, the bounded clamp-then-round, the
legacy ``roundf``/truncation shortcuts, and chunked, threaded ``quantize_rows`` (bytes do not
depend on the chunk size or the number of threads)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quantbench.quant.gguf import legacy, search
from quantbench.quant.gguf.codec import get_codec

TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def _loop_sum(t: torch.Tensor, from_first: bool) -> torch.Tensor:
    acc = t[0].clone() if from_first else torch.zeros_like(t[0]) + t[0]
    for i in range(1, t.shape[0]):
        acc = acc + t[i]
    return acc


@pytest.mark.parametrize("shape", [(32, 3, 64), (16, 2), (16, 1), (1, 5), (257, 9), (7, 3, 1),
                                   (33, 5, 7), (1536, 4)])
def test_csum0_is_the_c_loop(shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-10, 10, shape))
    t = torch.from_numpy(x.astype(np.float32))
    t.view(-1)[::7] = -0.0
    t.view(-1)[::11] = 0.0
    for from_first in (False, True):
        ours, ref = search.csum0(t, from_first), _loop_sum(t, from_first)
        assert ours.dtype == torch.float32 and ours.shape == ref.shape
        assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))  # -0 vs +0 too
    assert torch.equal(search.seq_sum(t.movedim(0, -1)).view(torch.int32),
                       _loop_sum(t, False).view(torch.int32))


def test_first_abs_max_matches_index_search():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(-3, 4, (4000, 8)).astype(np.float32))
    x[5] = float("nan")
    x[6, 3] = float("nan")
    x[7] = 0.0
    x[8] = -0.0
    x[9, 0] = float("inf")
    x[10, 2], x[10, 5] = -float("inf"), float("inf")
    for t in (x, torch.randn(500, 32), x.reshape(10, 400, 8)):
        a, m = search.first_abs_max(t)
        b, n = search._first_abs_max_search(t)
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
        assert torch.equal(m.nan_to_num(7.0), n.nan_to_num(7.0))
        assert torch.equal(torch.signbit(m), torch.signbit(n))


def test_round_clamp_bounded_and_not():
    rng = np.random.default_rng(1)
    t = torch.from_numpy((rng.standard_normal(5000) * 6).astype(np.float32))
    t[:40] = torch.arange(-20, 20) / 2                          # exact .5 ties
    ref = search.nearest_int(t).clamp(-8, 7).float()
    small = torch.full((1,), 100.0)
    assert torch.equal(search._round_clamp(t.clone(), -8, 7, small), ref)
    huge = torch.cat([t, torch.tensor([5e6, -5e6, float("inf"), float("nan")])])
    ref = search.nearest_int(huge).clamp(-8, 7).float()        # the bit trick's garbage, kept
    assert torch.equal(search._round_clamp(huge.clone(), -8, 7, torch.tensor([float("inf")])),
                       ref)


def test_legacy_shortcuts_equal_the_c_casts():
    rng = np.random.default_rng(2)
    v = rng.uniform(-127.4, 127.4, 20000).astype(np.float32)
    v[:255] = np.arange(-127, 128) + 0.5 * np.sign(np.arange(-127, 128))   # ties
    v[255:260] = [0.49999997, -0.49999997, 0.5, -0.5, -0.0]
    v = torch.from_numpy(v)
    v = v[v.abs() < 127.5]
    assert torch.equal(legacy._roundf_int(v).long(), legacy._c_int8(legacy._roundf(v)))
    w = torch.from_numpy(rng.uniform(-0.99, 127.9, 20000).astype(np.float32))
    assert torch.equal(w.int().long(), legacy._c_int8(w))


def _weights(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)) * 0.02
    w[rng.random(w.shape) < 0.01] *= 50
    w[3, :256] = 3e-39 * rng.standard_normal(256)              # subnormal groups: bit trick
    w[4, :] = 0.0
    imp = (rng.random(cols) ** 4 * 50).astype(np.float32)
    return torch.from_numpy(w.astype(np.float32)), torch.from_numpy(imp)


@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_rows_independent_of_chunks_and_threads(type_name, monkeypatch):
    codec = get_codec(type_name)
    w, imp = _weights(24, 512, 3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = [codec.quantize_rows(w), codec.quantize_rows(w, imp)]
        torch.set_num_threads(2)
        monkeypatch.setattr(type(codec), "chunk_elements", 512 * 5)   # 5 rows per chunk
        assert torch.equal(codec.quantize_rows(w), ref[0])
        assert torch.equal(codec.quantize_rows(w, imp), ref[1])
        assert torch.equal(codec.quantize_rows(w.half()), codec.quantize_rows(w.half().float()))
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    # one super-block of a whole tensor at a time gives the same bytes as the whole rows
    blocks = torch.cat([codec.quantize(b) for b in w.reshape(-1, codec.block_size).split(7)])
    assert torch.equal(blocks.reshape(24, -1), ref[0])
