"""EXL2 grid maths, GPTQ on it, and the bit-allocation solver (pure functions, CPU, fast)."""
import itertools
import random

import numpy as np
import pytest
import torch

from quantbench.config import EXL2GridConfig, grid_from_dict
from quantbench.errors import ConfigError
from quantbench.quant.exl2.grid import (dequantize_codes, fit_group, group_layout, rint,
                                        round_codes, scales_from_codes, total_bits)
from quantbench.quant.exl2.gptq import exl2_quantize
from quantbench.quant.exl2.measure import check_target
from quantbench.quant.exl2.optimize import solve
from quantbench.quant.exl2.presets import LADDER, branch_candidates

MIX = "0.05:8b_32g/0.2:6b_64g/0.25:3b_64g/0.5:2b_32g"


@pytest.mark.parametrize("kwargs,needle", [
    ({"widths": (4, 7), "proportions": (0.5, 0.5), "group_sizes": (32, 32)}, "EXL2 width"),
    ({"widths": (3, 4), "proportions": (0.5, 0.5), "group_sizes": (32, 32)}, "descending"),
    ({"widths": (4,), "proportions": (0.9,), "group_sizes": (32,)}, "sum to 1"),
    ({"widths": (4,), "proportions": (1.0,), "group_sizes": (48,)}, "a multiple of 32"),
    ({"widths": (5, 4), "proportions": (1.0,), "group_sizes": (32, 32)}, "one proportion"),
    ({"bpw": 0.5}, "> 1 and <= 16"),
])
def test_config_refuses_bad_mixes(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        EXL2GridConfig(**kwargs)


def test_config_round_trips():
    grid = EXL2GridConfig.from_desc(MIX)
    assert grid.desc == MIX and grid.widths == (8, 6, 3, 2)
    assert grid_from_dict(grid.to_dict()) == grid
    target = EXL2GridConfig(bpw=4.65)
    assert grid_from_dict(target.to_dict()) == target and target.describe() == "EXL2 4.65 bpw"
    with pytest.raises(ConfigError, match="cannot read"):
        EXL2GridConfig.from_desc("4 bits please")
    with pytest.raises(ConfigError, match="multiple of 32"):
        grid.check_shape("x.weight", 64, 100)


@pytest.mark.parametrize("desc,rows,expect", [
    ("0.1:5b_128g/0.9:4b_128g", 4096, [(5, 128)] * 4 + [(4, 128)] * 28),  # 409.6 → 4 groups
    ("1:4b_128g", 576, [(4, 128)] * 4 + [(4, 64)]),                         # short last group
    ("0.05:8b_32g/0.95:6b_128g", 64, [(8, 32), (6, 32)]),
    ("0.1:4b_128g/0.9:3b_128g", 64, [(4, 64)]),                             # 3-bit left no rows
    (MIX, 256, [(8, 32), (6, 64), (3, 64), (2, 32), (2, 32), (2, 32)]),
])
def test_group_layout_follows_exllamav2(desc, rows, expect):
    assert group_layout(EXL2GridConfig.from_desc(desc), rows) == expect


def test_total_bits_counted_by_hand():
    # 1:4b_128g on 256 inputs × 64 outputs: codes, 2 groups × (16 + 32 + 64·4), invperm
    assert total_bits(EXL2GridConfig(), 256, 64) == 256 * 64 * 4 + 2 * (16 + 32 + 256) + 256 * 32
    grid = EXL2GridConfig.from_desc("0.1:5b_32g/0.9:4b_128g")   # groups 5b·32, 4b·128, 4b·96
    assert total_bits(grid, 256, 80, bias_numel=80) == \
        32 * 80 * 5 + 224 * 80 * 4 + 3 * (16 + 32 + 80 * 4) + 256 * 32 + 16 * 80


def test_scales_and_dequantization_are_half_products():
    g = torch.Generator().manual_seed(0)
    qs = torch.randint(1, 17, (50, 3), generator=g)
    qsm = (torch.rand(3, generator=g) * 0.2 + 1e-4).half()
    ours = scales_from_codes(qs, qsm)
    ref = np.float16(np.float16(qs.numpy() ** 2) * np.float16(qsm.numpy() / np.float16(256)))
    assert np.array_equal(ours.numpy(), ref)
    codes = torch.randint(0, 64, (50, 3), generator=g)
    deq = dequantize_codes(codes, ours, 32)
    assert np.array_equal(deq.numpy(), np.float16(np.float16(codes.numpy() - 32) * ref))


def test_rint_is_round_half_even():
    x = torch.cat([torch.arange(-20, 20) + 0.5, torch.randn(1000) * 100])
    assert torch.equal(rint(x), torch.round(x))
    assert torch.equal(round_codes(torch.tensor([[0.3, -9.0, 100.0]]), torch.tensor([[0.0]]), 4),
                       torch.tensor([[8.0, 8.0, 8.0]]))   # a zero scale: the zero code


def test_fit_group_never_worse_than_exllamav2_start():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 32, generator=g) * torch.rand(64, 1, generator=g)
    imp = torch.rand(32, generator=g) + 0.1
    for bits in (2, 3, 4, 5, 6, 8):
        qs, qsm = fit_group(w, bits, imp)
        assert qs.dtype == torch.uint8 and 1 <= int(qs.min()) and int(qs.max()) <= 16
        base = (w.abs().amax(dim=1) + 1e-12) / (((1 << bits) - 1) / 2)
        start_qs = torch.clamp(torch.round(torch.sqrt(base / base.max()) * 16), 1, 16)

        def err(q_s, q_max):
            s = scales_from_codes(q_s, q_max).unsqueeze(1)
            d = dequantize_codes(round_codes(w, s, bits), s, 1 << (bits - 1))
            return float(((w - d) ** 2 * imp).sum())

        assert err(qs, qsm) <= err(start_qs, base.max().half())


def test_all_zero_group_dequantizes_to_zero():
    w = torch.zeros(8, 64)
    w[0, :5] = 1.0
    qt, _ = exl2_quantize(w.half(), None, EXL2GridConfig((4,), (1.0,), (32,)))
    assert torch.equal(qt.dequantize()[1:], torch.zeros(7, 64))


def _correlated(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d) + 0.5 * torch.randn(d, d, generator=g) / d ** 0.5
    scale = torch.exp(torch.randn(d, generator=g))
    return (torch.randn(n, d, generator=g) @ mix) * scale


@pytest.mark.parametrize("desc", ["1:4b_32g", "0.1:5b_32g/0.9:3b_64g", "0.25:3b_64g/0.75:2b_64g"])
def test_gptq_beats_rtn_on_the_same_grid(desc):
    grid = EXL2GridConfig.from_desc(desc)
    x = _correlated(1024, 128, 0)
    w = (torch.randn(96, 128, generator=torch.Generator().manual_seed(2)) * 0.05).half()
    h = 2 * x.T @ x / x.shape[0]
    gptq, stats = exl2_quantize(w, h, grid)
    rtn, _ = exl2_quantize(w, None, grid)

    def out_err(qt):
        return float(((x @ (qt.dequantize() - w.float()).T) ** 2).mean())

    assert out_err(gptq) < 0.9 * out_err(rtn)
    assert gptq.storage_bits() == total_bits(grid, 128, 96) == rtn.storage_bits()
    perm = gptq.perm.long()
    assert torch.equal(perm, torch.argsort(torch.diag(h), descending=True))   # act-order
    layout = group_layout(grid, 128)
    row = 0
    for bits, rows in layout:                        # every code fits its group's width
        assert int(gptq.codes[:, perm[row:row + rows]].max()) < 1 << bits
        row += rows


def test_branch_candidates_lift_the_sensitive_linear():
    lins = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    cands = branch_candidates(lins)
    assert cands[0] == {lin: LADDER[0] for lin in lins}
    assert cands[1]["self_attn.v_proj"] == LADDER[1] and cands[1]["self_attn.q_proj"] == LADDER[0]
    assert len(cands) == 2 * len(LADDER) - 1
    assert len(branch_candidates(["self_attn.v_proj"])) == len(LADDER)


def _brute(costs, errors, budget):
    best = None
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        bits = sum(costs[s][k] for s, k in enumerate(choice))
        err = sum(errors[s][k] for s, k in enumerate(choice))
        if bits <= budget and (best is None or err < best - 1e-12):
            best = err
    return best


@pytest.mark.parametrize("seed", range(20))
def test_solver_is_exactly_optimal_on_small_instances(seed):
    rng = random.Random(seed)
    slots = rng.randint(1, 5)
    costs = [[rng.randint(1, 30) for _ in range(rng.randint(1, 4))] for _ in range(slots)]
    errors = [[rng.random() for _ in c] for c in costs]
    cheapest, dearest = sum(map(min, costs)), sum(map(max, costs))
    budget = rng.randint(cheapest, dearest)
    alloc = solve(costs, errors, budget)
    assert alloc.slack_bits == 0 and alloc.bits <= budget
    assert alloc.error == pytest.approx(_brute(costs, errors, budget), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_solver_on_coarse_units_fits_and_is_within_its_slack(seed):
    rng = random.Random(100 + seed)
    costs = [[rng.randint(10**6, 9 * 10**6) for _ in range(4)] for _ in range(5)]
    errors = [[rng.random() for _ in c] for c in costs]
    budget = (sum(map(min, costs)) + sum(map(max, costs))) // 2
    alloc = solve(costs, errors, budget, cells=1000)
    assert alloc.slack_bits > 0 and alloc.bits <= budget
    assert alloc.error <= _brute(costs, errors, budget - alloc.slack_bits) + 1e-12


def test_solver_refuses_a_budget_below_the_cheapest():
    with pytest.raises(ConfigError, match="cheapest"):
        solve([[5, 9], [4]], [[0.2, 0.1], [0.3]], 8)


def test_targets_outside_the_measured_range_are_refused():
    costs, numel = [[200, 400], [300, 800]], 100        # 5.0 .. 12.0 bpw
    check_target(5.0, costs, numel)
    check_target(12.0, costs, numel)
    with pytest.raises(ConfigError, match=r"below the cheapest.*5\.000 bpw.*--bpw 5\.00"):
        check_target(4.9, costs, numel)
    with pytest.raises(ConfigError, match=r"above the dearest.*12\.000 bpw.*--bpw 12\.00"):
        check_target(12.5, costs, numel)


def test_one_sweep_for_many_mixes_equals_separate_sweeps():
    from quantbench.quant.exl2.gptq import exl2_quantize_many, prepare_hessian

    x = _correlated(512, 128, 3)
    w = (torch.randn(64, 128, generator=torch.Generator().manual_seed(4)) * 0.05).half()
    prep = prepare_hessian(2 * x.T @ x / x.shape[0])
    grids = [EXL2GridConfig.from_desc(d) for d in ("1:4b_32g", MIX, "0.1:5b_32g/0.9:3b_64g")]
    for grid, (many, _) in zip(grids, exl2_quantize_many(w, prep, grids)):
        one, _ = exl2_quantize(w, prep, grid)
        assert (many.codes == one.codes).float().mean() > 0.999
        assert torch.allclose(many.dequantize(), one.dequantize(), atol=1e-2)


def test_branch_errors_are_relative_per_token():
    """A token with a massive activation must not hide the error on the others (per window,
    the error below would read ~0.0001 instead of ~0.5)."""
    import torch

    from quantbench.quant.exl2.measure import token_errors, token_norms

    y = torch.ones(1, 4, 8)
    y[0, 0] *= 1e4                          # a massive-activation token
    ref = torch.zeros(1, 4, 8)
    out = ref.clone()
    out[0, 1:] += 0.5                       # half the norm of y on every ordinary token
    errors = token_errors(out, ref, token_norms(y))
    assert errors.shape == (4,)
    assert errors[0] == 0 and torch.allclose(errors[1:], torch.full((3,), 0.5))
    window = torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(y)
    assert window < 1e-3 < float(errors.mean())
