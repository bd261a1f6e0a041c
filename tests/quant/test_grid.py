import pytest
import torch

from quantbench.config import IntGridConfig
from quantbench.errors import ConfigError
from quantbench.quant.grid import dequantize_codes, fit_scales, group_index, quantize_codes
from quantbench.quant.methods.rtn import rtn_quantize


def _grid(bits, sym, gs):
    return IntGridConfig.from_group_size(bits, gs, sym)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gs", [0, -1, 32, 48])
def test_error_bound_all_bit_widths(bits, sym, gs):
    torch.manual_seed(bits)
    w = torch.randn(16, 96) * 0.05
    grid = _grid(bits, sym, gs)
    qt = rtn_quantize(w, grid, torch.float32)
    assert qt.codes.dtype == torch.uint8
    assert int(qt.codes.max()) <= grid.qmax
    err = (qt.dequantize() - w).abs()
    step = qt.scales.float()[:, qt.group_index().long()] if qt.scales.shape[1] > 1 else qt.scales
    assert torch.all(err <= step / 2 + 1e-7), float((err - step / 2).max())


@pytest.mark.parametrize("sym", [True, False])
def test_zero_weights_and_zero_groups_stay_zero(sym):
    w = torch.zeros(4, 64)
    w[0, :32] = torch.linspace(-1, 1, 32)
    qt = rtn_quantize(w.half(), _grid(4, sym, 32), torch.float16)
    deq = qt.dequantize()
    assert torch.all(deq[1:] == 0)
    assert torch.all(deq[0, 32:] == 0)
    assert torch.isfinite(qt.scales.float()).all() and (qt.scales.float() > 0).all()
    # exact zero is representable on both grids
    assert deq[0, 15:17].abs().min() < 0.07


def test_tiny_values_do_not_underflow_fp16_scales():
    w = torch.full((2, 32), 1e-9)
    qt = rtn_quantize(w, _grid(4, True, 32), torch.float16)
    assert (qt.scales.float() > 0).all()
    assert (qt.dequantize() - w).abs().max() < 1e-7


def test_symmetric_grid_matches_gptq_convention():
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0, 0.25, -0.25, 0.75]])
    grid = _grid(4, True, -1)
    scales, zeros = fit_scales(w, grid, torch.float32)
    assert zeros is None
    assert torch.allclose(scales, torch.tensor([[2 / 15]]))
    codes = quantize_codes(w, scales, None, grid)
    assert int(codes.min()) in (0, 1) and int(codes.max()) == 15  # ±1 → ±7.5 (fp rounding)


def test_zero_point_range_contains_zero():
    w = torch.tensor([[0.5, 0.6, 0.9, 1.0]])  # all positive: min forced to 0
    grid = _grid(4, False, -1)
    scales, zeros = fit_scales(w, grid, torch.float32)
    assert int(zeros) == 0
    assert torch.allclose(scales, torch.tensor([[1.0 / 15]]))


def test_partial_last_group_uses_ceil_groups():
    grid = _grid(4, False, 128)
    w = torch.randn(8, 576)
    qt = rtn_quantize(w, grid, torch.float16)
    assert qt.scales.shape == (8, 5)
    assert torch.equal(group_index(576, grid), torch.arange(576, dtype=torch.int32) // 128)
    # the short last group is fitted on its own 64 columns only
    alone = rtn_quantize(w[:, 512:], _grid(4, False, -1), torch.float16)
    assert torch.equal(qt.codes[:, 512:], alone.codes)
    assert torch.equal(qt.scales[:, 4:], alone.scales)


def test_dequantize_codes_is_inverse_on_grid_points():
    grid = _grid(3, False, 16)
    codes = torch.randint(0, 8, (4, 32), dtype=torch.uint8)
    scales = torch.rand(4, 2).half() + 0.1
    zeros = torch.randint(0, 8, (4, 2), dtype=torch.int32)
    w = dequantize_codes(codes, scales, zeros, grid)
    assert torch.equal(quantize_codes(w, scales, zeros, grid), codes)


@pytest.mark.parametrize("bad", [1, 9, 0, "4"])
def test_bits_out_of_range_refused(bad):
    with pytest.raises(ConfigError, match="bits must be"):
        IntGridConfig(bits=bad)


def test_group_size_that_cannot_work():
    with pytest.raises(ConfigError, match="group-size must be"):
        IntGridConfig.from_group_size(4, -5, True)
    with pytest.raises(ConfigError, match="larger than the row"):
        _grid(4, True, 1024).check_shape("x", 8, 576)


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (3, 24, False), (4, 24, True),
                                            (8, -1, True), (2, -1, False), (4, 0, False)])
def test_fake_quantize_equals_the_written_values(bits, group, sym):
    from quantbench.quant.grid import dequantize_codes, fake_quantize, fit_scales, quantize_codes

    grid = IntGridConfig.from_group_size(bits, group, sym)
    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(bits))
    scales, zeros = fit_scales(w, grid)
    expect = dequantize_codes(quantize_codes(w, scales, zeros, grid), scales, zeros, grid)
    assert torch.equal(fake_quantize(w, grid), expect)
