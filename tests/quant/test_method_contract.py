"""The method contract (``quant/methods/base.py``) and composition (``methods/transform.py``)."""
import re
from pathlib import Path

import pytest
import torch

from quantbench.api import quantize
from quantbench.config import QuantizeConfig
from quantbench.errors import ConfigError
from quantbench.quant.methods.base import Method
from quantbench.quant.run import make_config
from quantbench.registry import get_method, method_names

PACKAGE = Path(__file__).resolve().parents[2] / "quantbench"
ORCHESTRATION = ["quant/run.py", "calibration/pipeline.py", "calibration/plan.py",
                 "formats/io.py", "formats/gguf.py"]
HOOKS = ["needs_calibration", "statistic", "device_capable", "attention_values", "has_imatrix",
         "prepare", "tensor_types", "plan_costs", "prepare_block", "transform_block",
         "quantize_weight", "quantize_with_stats", "quantize_many_with_stats", "gguf_metadata",
         "side_files", "option_names", "check_options", "build_options"]


@pytest.mark.parametrize("path", ORCHESTRATION)
def test_orchestration_probes_no_hooks(path):
    """Orchestration calls the declared contract; nothing is discovered by name."""
    text = (PACKAGE / path).read_text()
    assert not re.search(r"\b(getattr|hasattr)\(", text), path


def test_the_base_declares_every_hook_and_every_method_is_one():
    for hook in HOOKS:
        assert hook in vars(Method), hook
    for name in method_names():
        assert issubclass(get_method(name), Method), name
    for old in ("outputs", "write_outputs", "write_side_files", "wants_attention_values"):
        assert not any(old in vars(cls) for cls in get_method("awq").__mro__), old


def test_base_defaults():
    m = get_method("absmax")(make_config("absmax", 4, 32))
    assert m.statistic is None and not m.needs_calibration and not m.attention_values
    assert m.tensor_types() == {} and m.gguf_metadata() == [] and m.side_files(Path(".")) == []
    assert m.quantize_many_with_stats(["a"], [torch.zeros(1, 1)], None) is None
    tensors = {"x": torch.ones(2)}
    assert m.transform_block(None, 0, tensors) is tensors


# ------------------------------------------------------------------------ composition (awq)

def test_awq_delegates_to_its_inner_method():
    rtn = get_method("awq")(make_config("awq", 4, 32))
    assert type(rtn.inner).__name__ == "RTN" and rtn.statistic is None
    gptq = get_method("awq")(make_config("awq", 4, 32, then="gptq", attention_values=True))
    assert type(gptq.inner).__name__ == "GPTQ"
    assert gptq.statistic == "hessian" and gptq.attention_values and gptq.has_imatrix


def test_gptq_under_awq_keeps_the_measured_defaults_and_takes_every_option():
    o = make_config("awq", 4, 32, then="gptq", calib_samples=4).options
    i = o.inner
    assert (i.act_order, i.static_groups, i.scale_search, i.attention_values,
            i.damp_percent, i.block_size) == (False, True, True, False, 0.01, 128)
    assert i.calib_samples == 4  # the calibration the transform runs on
    set_all = make_config("awq", 4, 32, then="gptq", act_order=True, static_groups=False,
                          scale_search=False, attention_values=True, damp_percent=0.02,
                          block_size=64).options.inner
    assert (set_all.act_order, set_all.static_groups, set_all.scale_search,
            set_all.attention_values, set_all.damp_percent, set_all.block_size) == \
        (True, False, False, True, 0.02, 64)
    config = make_config("awq", 4, 32, then="gptq", act_order=True)
    assert QuantizeConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["options"]["act_order"] is True  # flat, as given


def test_an_option_the_inner_method_lacks_is_refused():
    with pytest.raises(ConfigError, match="then rtn takes no scale_search option.*then gptq"):
        make_config("awq", 4, 32, scale_search=False)
    with pytest.raises(ConfigError, match="then rtn takes no act_order"):
        make_config("awq", 4, 32, then="rtn", act_order=True)
    with pytest.raises(ConfigError, match="--then must be rtn or gptq"):
        make_config("awq", 4, 32, then="exl2")


def _codes(q) -> dict[str, torch.Tensor]:
    return {n: t.codes for _, block in q.iter_blocks() for n, t in block.items()
            if hasattr(t, "codes")}


def test_gptq_options_under_awq_change_the_result(tiny_llama):
    """scale_search and attention_values were silently dropped before: now they apply."""
    base = dict(bits=4, group_size=32, then="gptq", calib_samples=4, calib_len=32, n_grid=3,
                clip=False)
    ref = _codes(quantize(str(tiny_llama), method="awq", **base))
    no_search = _codes(quantize(str(tiny_llama), method="awq", scale_search=False, **base))
    assert any(not torch.equal(ref[n], no_search[n]) for n in ref)
    values = _codes(quantize(str(tiny_llama), method="awq", attention_values=True, **base))
    v = [n for n in ref if "v_proj" in n]
    assert v and any(not torch.equal(ref[n], values[n]) for n in v)
    assert all(torch.equal(ref[n], values[n]) for n in ref if "layers.0.self_attn.q" in n)
