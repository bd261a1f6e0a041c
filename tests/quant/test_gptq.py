import pytest
import torch

from quantbench.config import IntGridConfig
from quantbench.quant.gptq import GPTQParams, gptq_quantize, inverse_hessian_cholesky
from quantbench.quant.methods.rtn import rtn_quantize


def _problem(out_f=32, in_f=128, n=512, seed=0):
    """Correlated inputs (low-rank mixing + channel scales), as activations are."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 16, generator=g)
    X = base @ torch.randn(16, in_f, generator=g) + 0.1 * torch.randn(n, in_f, generator=g)
    X = X * torch.linspace(0.2, 3.0, in_f)
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    H = 2 * X.T @ X / n
    return W, X, H


def _out_err(W, Wq, X):
    return float(((X @ W.T - X @ Wq.T) ** 2).mean())


@pytest.mark.parametrize("bits,sym,group", [(4, False, 32), (3, True, 32), (4, True, -1),
                                            (2, False, 64), (8, True, 32)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_layer_output(bits, sym, group, act_order):
    W, X, H = _problem()
    grid = IntGridConfig.from_group_size(bits, group, sym)
    qt, stats = gptq_quantize(W, H, grid, GPTQParams(act_order=act_order),
                              scale_dtype=torch.float32)
    rtn = rtn_quantize(W, grid, torch.float32)
    assert _out_err(W, qt.dequantize(), X) < 0.8 * _out_err(W, rtn.dequantize(), X)
    assert int(qt.codes.max()) <= grid.qmax and stats.damp > 0


def test_act_order_g_idx_is_consistent():
    W, X, H = _problem(in_f=96)
    grid = IntGridConfig.from_group_size(4, 32, False)
    qt, _ = gptq_quantize(W, H, grid, GPTQParams(act_order=True))
    perm = qt.perm.long()
    assert torch.equal(perm, torch.argsort(torch.diag(H), descending=True))
    # groups are consecutive runs of 32 in processing order, mapped back to original columns
    expect = torch.empty(96, dtype=torch.int32)
    expect[perm] = (torch.arange(96) // 32).to(torch.int32)
    assert torch.equal(qt.g_idx, expect)
    # dequantize through g_idx equals scale[g_idx[c]]·(q − zero[g_idx[c]])
    c = int(perm[40])
    grp = int(qt.g_idx[c])
    manual = qt.scales[:, grp].float() * (qt.codes[:, c].float() - qt.zeros[:, grp].float())
    assert torch.allclose(qt.dequantize()[:, c], manual)


def test_static_groups_and_no_act_order_use_plain_groups():
    W, X, H = _problem(in_f=64)
    grid = IntGridConfig.from_group_size(4, 32, True)
    for p in (GPTQParams(act_order=False), GPTQParams(act_order=True, static_groups=True)):
        qt, _ = gptq_quantize(W, H, grid, p)
        assert qt.g_idx is None and qt.scales.shape == (32, 2)


def test_dead_columns_and_damping_increase():
    W, X, H = _problem(in_f=64)
    H[5, :] = 0
    H[:, 5] = 0
    qt, _ = gptq_quantize(W, H, IntGridConfig.from_group_size(4, 32, False))
    assert torch.all(qt.dequantize()[:, 5] == 0)
    v = torch.arange(1.0, 9.0).reshape(8, 1)
    m = float((v * v).mean())
    indefinite = v @ v.T - 0.02 * m * torch.eye(8)  # 1 % damping is not enough, 10 % is
    _, damp, increased = inverse_hessian_cholesky(indefinite, 0.01)
    assert increased and damp == pytest.approx(0.1 * float(torch.diag(indefinite).mean()))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("granularity", ["group", "channel"])
def test_scale_search_never_worse_than_minmax(sym, granularity):
    from quantbench.quant.grid import (dequantize_codes, fit_scales, quantize_codes,
                                       search_scales)

    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 100, generator=g) + torch.randn(24, 100, generator=g).pow(5) * 0.05
    imp = torch.rand(100, generator=g) * 3
    grid = IntGridConfig.from_group_size(3, 32 if granularity == "group" else -1, sym)

    def weighted_err(params):
        q = quantize_codes(w, *params, grid)
        return ((dequantize_codes(q, *params, grid) - w) ** 2 * imp).sum()

    plain, searched = fit_scales(w, grid), search_scales(w, grid, importance=imp)
    assert weighted_err(searched) <= weighted_err(plain)
    assert weighted_err(searched) < 0.95 * weighted_err(plain)  # heavy tails: clipping pays
    assert searched[0].dtype == plain[0].dtype and searched[0].shape == plain[0].shape


@pytest.mark.parametrize("static", [True, False])
def test_scale_search_lowers_gptq_output_error(static):
    """Heavy-tailed weights, correlated inputs with outlier channels: shrinking each group's
    range where diag(H) says it pays lowers the layer-output error of GPTQ itself."""
    g = torch.Generator().manual_seed(0)
    in_f, out_f, n = 256, 64, 2048
    mix = torch.randn(in_f, in_f, generator=g) / in_f ** 0.5 + torch.eye(in_f)
    X = (torch.randn(n, in_f, generator=g) @ mix) * torch.exp(torch.randn(in_f, generator=g))
    W = torch.randn(out_f, in_f, generator=g) * 0.05 + torch.randn(
        out_f, in_f, generator=g).pow(3) * 0.01
    H = 2 * X.T @ X / n
    grid = IntGridConfig.from_group_size(4, 64, False)
    errs = [_out_err(W, gptq_quantize(W, H, grid, GPTQParams(0.01, 128, True, static, s))[0]
                     .dequantize(), X) for s in (False, True)]
    assert errs[1] < 0.9 * errs[0], errs


@pytest.mark.parametrize("static,act_order,sym,group", [(True, True, False, 32),
                                                        (False, True, True, 32),
                                                        (False, False, False, 64),
                                                        (True, False, True, -1)])
def test_shared_input_sweep_equals_one_sweep_each(static, act_order, sym, group):
    """q/k/v (or gate/up) stacked row-wise: one factorisation, one column loop, same codes."""
    from quantbench.quant.gptq import gptq_quantize_many

    W, X, H = _problem(out_f=96)
    parts = [W[:32].half(), W[32:48].half(), W[48:].half()]
    grid = IntGridConfig.from_group_size(4, group, sym)
    params = GPTQParams(act_order=act_order, static_groups=static)
    many = gptq_quantize_many(parts, H, grid, params)
    for w, (qt, stats) in zip(parts, many):
        one, one_stats = gptq_quantize(w, H, grid, params)
        assert qt.codes.shape == w.shape and qt.dtype == torch.float16
        assert (qt.codes == one.codes).float().mean() > 0.999
        assert torch.allclose(qt.dequantize(), one.dequantize(), atol=1e-3)
        assert qt.scales.shape == one.scales.shape and torch.allclose(
            qt.scales.float(), one.scales.float(), rtol=1e-3)
        assert (qt.g_idx is None) == (one.g_idx is None)
        if qt.g_idx is not None:
            assert torch.equal(qt.g_idx, one.g_idx)
        assert stats.proxy_error == pytest.approx(one_stats.proxy_error, rel=1e-3)


@pytest.mark.parametrize("static", [True, False])
def test_row_parts_on_worker_threads_equal_one_sweep(static, monkeypatch):
    """Rows swept side by side on worker threads (shared factorisation) = one sweep."""
    import quantbench.quant.gptq as gptq_mod

    W, X, H = _problem(out_f=96)
    grid = IntGridConfig.from_group_size(4, 32, False)
    params = GPTQParams(static_groups=static)
    one, one_stats = gptq_quantize(W, H, grid, params)
    monkeypatch.setattr(gptq_mod, "PART_MIN_ELEMENTS", 1024)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert len(gptq_mod.row_parts(W)) == 3
        split, stats = gptq_quantize(W, H, grid, params)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(split.codes, one.codes) and torch.equal(split.scales, one.scales)
    assert torch.equal(split.zeros, one.zeros)
    assert (split.g_idx is None) == (one.g_idx is None)
    assert stats.proxy_error == pytest.approx(one_stats.proxy_error, rel=1e-5)


def test_float_target_weight_is_the_least_squares_target():
    """GPTQ on ``W̃`` with ``H`` of the quantized model's inputs minimises the error against
    the float model's outputs: ``‖W·X_f − Q·X_q‖² = ‖(W̃ − Q)·X_q‖² + const`` for any ``Q``,
    ``W̃`` the least-squares fit of ``W·X_f`` from ``X_q``; equal inputs give ``W`` itself."""
    from quantbench.quant.gptq import float_target_weight

    W, Xq, H = _problem(out_f=8, in_f=24, n=400)
    g = torch.Generator().manual_seed(1)
    Xf = Xq + 0.2 * torch.randn(Xq.shape, generator=g) * Xq.std(0)
    Xq, Xf, W = Xq.double(), Xf.double(), W.double()
    n = Xq.shape[0]
    C = 2 * Xf.T @ Xq / n
    Wt = float_target_weight(W, C, 2 * Xq.T @ Xq / n, damp_percent=1e-9).double()
    lstsq = torch.linalg.lstsq(Xq, Xf @ W.T).solution.T
    assert torch.allclose(Wt, lstsq, rtol=1e-3, atol=1e-5)
    gaps = []
    for seed in (2, 3):
        Q = W + 0.05 * torch.randn(W.shape, generator=torch.Generator().manual_seed(seed),
                                   dtype=torch.float64)
        gaps.append(float(((Xf @ W.T - Xq @ Q.T) ** 2).sum() - ((Xq @ (Wt - Q).T) ** 2).sum()))
    assert gaps[0] == pytest.approx(gaps[1], rel=1e-4)
    same = float_target_weight(W.float(), H, H, damp_percent=0.01)
    assert torch.equal(same, W.float())
