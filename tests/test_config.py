import pytest

from quantbench.config import CONFIG_VERSION, IntGridConfig, QuantizeConfig, TargetConfig
from quantbench.errors import ConfigError
from quantbench.quant.run import make_config
from quantbench.registry import format_names, get_format, get_method, method_names


@pytest.mark.parametrize("grid", [
    IntGridConfig(bits=3, symmetric=False, granularity="group", group_size=64),
    IntGridConfig.from_group_size(8, -1, True),
    IntGridConfig.from_group_size(2, 0, False),
])
def test_grid_round_trip(grid):
    d = grid.to_dict()
    assert d["version"] == CONFIG_VERSION and d["kind"] == "int"
    assert IntGridConfig.from_dict(d) == grid


def test_quantize_config_round_trip_and_frozen():
    cfg = make_config("zeropoint", 4, 64, targets=TargetConfig(exclude=("down_proj",), lm_head=True))
    again = QuantizeConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(Exception):
        cfg.method = "absmax"  # frozen


def test_newer_config_version_refused():
    d = IntGridConfig().to_dict()
    d["version"] = CONFIG_VERSION + 1
    with pytest.raises(ConfigError, match="upgrade quantbench"):
        IntGridConfig.from_dict(d)


def test_registry_lists_and_errors():
    assert {"absmax", "zeropoint"} <= set(method_names())
    assert {"dense", "compressed-tensors"} <= set(format_names())
    with pytest.raises(ConfigError, match="unknown method 'nope'.*absmax"):
        get_method("nope")
    with pytest.raises(ConfigError, match="unknown format 'nope'"):
        get_format("nope")


def test_method_refuses_wrong_grid_kind():
    with pytest.raises(ConfigError, match="--method zeropoint"):
        get_method("absmax")(make_config("absmax", 4, 64, symmetric=False))
    assert make_config("zeropoint", 4, 64).grid.symmetric is False
    assert make_config("absmax", 4, 64).grid.symmetric is True
