"""Grids as registered objects: the registry, serialisation, the hooks a QuantizedTensor calls,
stacks of experts, and the one-way imports (config → quant.grids → pure maths)."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import quantbench.config as config
from quantbench.errors import ConfigError
from quantbench.quant.grids import (GRIDS, CodebookGridConfig, EXL2GridConfig, GGUFGridConfig,
                                    Grid, Int8RowGridConfig, IntGridConfig, grid_from_dict,
                                    register_grid)
from quantbench.tensor import QuantizedTensor

PACKAGE = Path(config.__file__).resolve().parent

EXAMPLES = [
    IntGridConfig(4, True, "group", 64),
    IntGridConfig(3, False, "channel"),
    IntGridConfig(8, True, "tensor"),
    CodebookGridConfig("nf4", 64, True),
    CodebookGridConfig("fp4", 128, False),
    Int8RowGridConfig(),
    GGUFGridConfig("Q4_K_M"),
    GGUFGridConfig("q6_k"),
    EXL2GridConfig((5, 4), (0.1, 0.9), (32, 128)),
    EXL2GridConfig(bpw=4.65),
]


def test_every_builtin_kind_is_registered():
    assert {"int", "codebook", "int8_row", "gguf", "exl2"} <= set(GRIDS)
    for kind, cls in GRIDS.items():
        assert cls.kind == kind and issubclass(cls, Grid)
    assert config.GRIDS is GRIDS


def test_config_reexports_the_grid_classes():
    assert config.IntGridConfig is IntGridConfig
    assert config.CodebookGridConfig is CodebookGridConfig
    assert config.Int8RowGridConfig is Int8RowGridConfig
    assert config.GGUFGridConfig is GGUFGridConfig
    assert config.EXL2GridConfig is EXL2GridConfig
    assert config.grid_from_dict is grid_from_dict


@pytest.mark.parametrize("grid", EXAMPLES, ids=lambda g: g.describe())
def test_round_trip(grid):
    data = grid.to_dict()
    assert data["kind"] == grid.kind and data["version"] == config.CONFIG_VERSION
    assert grid_from_dict(data) == grid
    assert type(grid).from_dict(data) == grid


def test_dicts_keep_their_layout():
    """Manifests written before grids moved read back, and new ones look the same."""
    assert IntGridConfig(4, True, "group", 64).to_dict() == {
        "kind": "int", "version": 1, "bits": 4, "symmetric": True, "granularity": "group",
        "group_size": 64}
    assert CodebookGridConfig("nf4", 64, True).to_dict() == {
        "kind": "codebook", "version": 1, "codebook": "nf4", "block_size": 64,
        "double_quant": True}
    assert Int8RowGridConfig().to_dict() == {"kind": "int8_row", "version": 1}
    assert GGUFGridConfig("Q4_K").to_dict() == {"kind": "gguf", "version": 1, "type": "Q4_K"}
    assert EXL2GridConfig((5, 4), (0.1, 0.9), (32, 128)).to_dict() == {
        "kind": "exl2", "version": 1, "widths": [5, 4], "proportions": [0.1, 0.9],
        "group_sizes": [32, 128], "bpw": None}
    assert grid_from_dict({"bits": 3, "group_size": 32}) == IntGridConfig(3, True, "group", 32)


def test_unknown_kind_is_refused_in_one_line():
    with pytest.raises(ConfigError) as info:
        grid_from_dict({"kind": "hqq", "version": 1})
    message = str(info.value)
    assert "\n" not in message and "'hqq'" in message
    assert all(kind in message for kind in ("int", "codebook", "gguf", "exl2"))


def test_newer_version_and_wrong_kind_are_refused():
    with pytest.raises(ConfigError, match="newer"):
        grid_from_dict({"kind": "gguf", "version": config.CONFIG_VERSION + 1})
    with pytest.raises(ConfigError, match="expected an 'int' grid"):
        IntGridConfig.from_dict({"kind": "gguf"})


def test_register_grid_refuses_a_second_class_for_a_kind():
    @dataclasses.dataclass(frozen=True)
    class Other(Grid):
        kind: ClassVar[str] = "int"

    with pytest.raises(ValueError, match="already registered"):
        register_grid(Other)
    assert GRIDS["int"] is IntGridConfig


def test_a_new_grid_is_one_class():
    @dataclasses.dataclass(frozen=True)
    class Ternary(Grid):
        kind: ClassVar[str] = "test_ternary"
        bits: ClassVar[int] = 2
        scale: float = 1.0

    register_grid(Ternary)
    try:
        assert grid_from_dict({"kind": "test_ternary", "scale": 0.5}) == Ternary(0.5)
    finally:
        del GRIDS["test_ternary"]


# -- the hooks a QuantizedTensor calls ----------------------------------------------------------

def _weight(out_f: int = 8, in_f: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


RTN_GRIDS = [IntGridConfig(4, True, "group", 64), IntGridConfig(4, False, "channel"),
             CodebookGridConfig("nf4", 64, True), Int8RowGridConfig(), GGUFGridConfig("Q4_K"),
             GGUFGridConfig("Q8_0"), EXL2GridConfig((4,), (1.0,), (128,))]


@pytest.mark.parametrize("grid", RTN_GRIDS, ids=lambda g: g.describe())
def test_rtn_dequantize_and_bits(grid):
    w = _weight()
    qt = grid.rtn(w)
    assert qt.grid == grid and qt.shape == tuple(w.shape) and qt.numel == w.numel()
    deq = qt.dequantize()
    assert deq.shape == w.shape and deq.dtype == torch.float32
    assert float((deq - w).square().mean()) < 0.05 * float(w.square().mean())
    assert qt.storage_bits() > 0 and qt.equal(grid.rtn(w))
    assert not qt.equal(grid.rtn(_weight(seed=1)))


def test_validation_is_the_grids():
    qt = IntGridConfig(4, True, "group", 64).rtn(_weight())
    with pytest.raises(ValueError, match="groups"):
        QuantizedTensor(qt.codes, qt.scales[:, :2], None, qt.grid)
    gguf = GGUFGridConfig("Q4_K").rtn(_weight())
    with pytest.raises(ValueError, match="byte blocks"):
        QuantizedTensor(gguf.codes[:, :-1], gguf.scales, None, gguf.grid)


def test_grids_without_a_fit_say_so():
    with pytest.raises(ConfigError, match="GPTQ has no column rounder"):
        CodebookGridConfig().gptq(_weight(), torch.eye(256), None)
    with pytest.raises(ConfigError):
        GGUFGridConfig("Q4_K_M").rtn(_weight())   # a mixture: plan it first


def test_int_gptq_on_the_grid_matches_the_function():
    from quantbench.quant.gptq import GPTQParams, gptq_quantize

    w = _weight(16, 128)
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    h = 2 * x.T @ x / 64
    grid = IntGridConfig(4, True, "group", 32)
    qt, _ = grid.gptq(w, h, GPTQParams())
    ref, _ = gptq_quantize(w, h, grid, GPTQParams(), torch.float16)
    assert qt.equal(ref) and qt.perm is not None


# -- stacks (MoE experts) -----------------------------------------------------------------------

@pytest.mark.parametrize("grid", [IntGridConfig(4, False, "group", 64), IntGridConfig(8, True,
                                  "tensor"), CodebookGridConfig("nf4", 64, True),
                                  GGUFGridConfig("Q4_K")], ids=lambda g: g.describe())
def test_stack_of_experts(grid):
    parts = [grid.rtn(_weight(seed=s)) for s in range(3)]
    parts[1].meta["note"] = "expert 1"
    qt = QuantizedTensor.stack(parts)
    assert qt.stacked and len(qt) == 3 and qt.codes.dim() == 3
    assert qt.shape == (3, 8, 256) and qt.numel == 3 * 8 * 256
    assert torch.equal(qt.dequantize(), torch.stack([p.dequantize() for p in parts]))
    assert qt.dequantize(torch.float16).dtype == torch.float16
    assert qt.storage_bits() == sum(p.storage_bits() for p in parts)
    assert qt.bits_per_weight() == pytest.approx(parts[0].bits_per_weight(), rel=0.01)
    for i, p in enumerate(parts):
        assert qt[i].equal(p) and qt[i].meta == p.meta
    assert qt.equal(QuantizedTensor.stack([grid.rtn(_weight(seed=s)) for s in range(3)]))
    assert not qt.equal(QuantizedTensor.stack(parts[::-1]))
    assert not qt.equal(parts[0])


def test_stack_with_act_order():
    from quantbench.quant.gptq import GPTQParams

    grid = IntGridConfig(4, True, "group", 32)
    parts = []
    for s in range(2):
        x = torch.randn(64, 128, generator=torch.Generator().manual_seed(10 + s))
        parts.append(grid.gptq(_weight(16, 128, s), 2 * x.T @ x / 64, GPTQParams())[0])
    qt = QuantizedTensor.stack(parts)
    assert qt.g_idx.shape == (2, 128) and qt.perm.shape == (2, 128)
    assert torch.equal(qt.dequantize()[1], parts[1].dequantize())
    assert qt.to("cpu") is qt


def test_stack_refuses_mismatches():
    a = IntGridConfig(4, True, "group", 64).rtn(_weight())
    b = IntGridConfig(4, True, "group", 32).rtn(_weight())
    with pytest.raises(ValueError, match="one shape, grid"):
        QuantizedTensor.stack([a, b])
    with pytest.raises(ValueError, match="no tensors"):
        QuantizedTensor.stack([])
    qt = QuantizedTensor.stack([a, a])
    with pytest.raises(ValueError, match="leading dimension of 2"):
        QuantizedTensor(qt.codes, qt.scales[:1], None, qt.grid)
    with pytest.raises(IndexError):
        qt[2]
    with pytest.raises(TypeError):
        a[0]


# -- one-way imports ---------------------------------------------------------------------------

def _runtime_imports(path: Path) -> set[str]:
    """Modules ``path`` imports outside ``if TYPE_CHECKING:`` blocks (functions included)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("module", ["quant/grid.py", "quant/bnb.py", "quant/exl2/grid.py",
                                    "quant/gguf/codec.py", "quant/gptq.py",
                                    "quant/exl2/gptq.py", "quant/gguf/gptq_grid.py",
                                    "quant/grids/base.py", "quant/grids/int.py",
                                    "quant/grids/codebook.py", "quant/grids/int8_row.py",
                                    "quant/grids/gguf.py", "quant/grids/exl2.py"])
def test_imports_flow_one_way(module):
    imports = _runtime_imports(PACKAGE / module)
    assert "quantbench.config" not in imports
    if not module.startswith("quant/grids/"):
        assert not any(m.startswith("quantbench.quant.grids") for m in imports)
    if module in ("quant/grid.py", "quant/bnb.py", "quant/exl2/grid.py", "quant/gguf/codec.py"):
        assert "quantbench.tensor" not in imports
    assert not any(m.startswith("quantbench.quant.methods") for m in imports)


@pytest.mark.parametrize("module", ["tensor.py"] + sorted(
    str(p.relative_to(PACKAGE)) for p in (PACKAGE / "quant" / "methods").glob("*.py")))
def test_no_kind_string_branching(module):
    tree = ast.parse((PACKAGE / module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) \
                and node.left.attr == "kind":
            pytest.fail(f"{module}:{node.lineno} branches on a grid kind")
