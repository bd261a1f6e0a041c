import json

import pytest
import torch

from quantbench.api import quantize, save
from quantbench.config import IntGridConfig, TargetConfig
from quantbench.errors import ConfigError, FormatError
from quantbench.formats.awq import AWQFormat, awq_decode, awq_encode
from quantbench.formats.io import open_artifact
from quantbench.formats.packing import pack_awq_cols
from quantbench.models.loader import load_model
from quantbench.quant.methods.rtn import rtn_quantize
from quantbench.quant.run import make_config
from quantbench.tensor import QuantizedTensor

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def ref_unpack_awq(packed: torch.Tensor) -> list[list[int]]:
    """FORMATS.md §2.2 read independently: nibble i of word col holds column col*8+ORDER[i]."""
    rows = []
    for row in packed.tolist():
        values = [0] * (8 * len(row))
        for col, word in enumerate(row):
            for i in range(8):
                values[col * 8 + ORDER[i]] = ((word & 0xFFFFFFFF) >> (4 * i)) & 0xF
        rows.append(values)
    return rows


def test_round_trip_bit_exact(write_tiny):
    w = write_tiny("awq", method="zeropoint", bits=4, group_size=32)
    model, q, out, art = w.model, w.q, w.out, w.art
    w.assert_quantized_like_rtn()
    for name in q.targets:
        expect = w.rtn_reference(name)
        module = name[: -len(".weight")]
        out_f, in_f = expect.shape
        assert art.weights.shape(f"{module}.qweight") == (in_f, out_f // 8)
        assert art.weights.shape(f"{module}.qzeros") == (in_f // 32, out_f // 8)
        assert art.weights.shape(f"{module}.scales") == (in_f // 32, out_f)
    assert "lm_head.weight" in art.plain_names
    assert not any(n.endswith((".qzeros", ".scales")) for n in art.plain_names)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "awq", "zero_point": True, "group_size": 32, "bits": 4,
                  "version": "gemm", "modules_to_not_convert": None}
    assert dict(art.dequantized()).keys() == set(model.weights.names())


def test_interleave_matches_independent_reading():
    gen = torch.Generator().manual_seed(0)
    grid = IntGridConfig(bits=4, symmetric=False, granularity="group", group_size=16)
    codes = torch.randint(0, 16, (24, 64), generator=gen).to(torch.uint8)
    zeros = torch.randint(0, 16, (24, 4), generator=gen).to(torch.int32)
    qt = QuantizedTensor(codes, torch.rand(24, 4, generator=gen).half(), zeros, grid)
    parts = awq_encode(qt)
    assert parts["qweight"].shape == (64, 3) and parts["qzeros"].shape == (4, 3)
    assert ref_unpack_awq(parts["qweight"]) == codes.t().tolist()
    assert ref_unpack_awq(parts["qzeros"]) == zeros.t().tolist()
    # columns 0..7 = 1..8 → nibbles hold 1,3,5,7,2,4,6,8: word 0x86427531
    one = torch.arange(1, 9, dtype=torch.uint8).reshape(1, 8)
    assert int(pack_awq_cols(one)[0, 0]) & 0xFFFFFFFF == 0x86427531
    assert awq_decode(parts["qweight"], parts["qzeros"], parts["scales"], 16).equal(qt)


def test_reads_autoawq_quant_config_without_manifest(tiny_llama, tmp_path):
    model = load_model(tiny_llama)
    q = quantize(model, method="zeropoint", bits=4, group_size=32)
    out = save(q, tmp_path / "awq", format="awq")
    (out / "quantbench.json").unlink()
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))
    (out / "quant_config.json").write_text(json.dumps(
        {"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"}))
    art = open_artifact(out)
    assert art.format == "awq"
    name = q.targets[-1]
    assert art.quantized(name).equal(
        rtn_quantize(model.weights.get(name), q.config.grid, torch.float16))


def test_refuses_gemv(tiny_llama, tmp_path):
    q = quantize(str(tiny_llama), method="zeropoint", bits=4, group_size=32)
    out = save(q, tmp_path / "awq", format="awq")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["version"] = "gemv"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="only 'gemm'"):
        open_artifact(out)


@pytest.mark.parametrize("method,bits,group,match", [
    ("zeropoint", 3, 32, "--bits 4"), ("absmax", 4, 32, "--zero-point"),
    ("zeropoint", 4, -1, "--group-size 128"), ("zeropoint", 4, 48, "--group-size 32")])
def test_refusals_leave_no_output(tiny_llama, tmp_path, assert_nothing_written,
                                  method, bits, group, match):
    q = quantize(str(tiny_llama), method=method, bits=bits, group_size=group)
    with pytest.raises(ConfigError, match=match) as exc:
        save(q, tmp_path / "x", format="awq")
    assert "\n" not in str(exc.value)
    assert_nothing_written(tmp_path / "x")


def test_refuses_act_order_but_not_static_groups(tiny_llama):
    model = load_model(tiny_llama)
    targets = ["model.layers.0.mlp.up_proj.weight"]
    dynamic = make_config("gptq", 4, 32, False, act_order=True, static_groups=False)
    with pytest.raises(ConfigError, match="--static-groups") as exc:
        AWQFormat().check(dynamic, model, targets)
    assert "\n" not in str(exc.value)
    AWQFormat().check(make_config("gptq", 4, 32, False, act_order=True, static_groups=True),
                      model, targets)


def test_refuses_embeddings_and_lists_unconverted(tiny_llama, tiny_llama_tied, tmp_path):
    q = quantize(str(tiny_llama_tied), method="zeropoint", bits=4, group_size=32,
                 targets=TargetConfig(lm_head=True))
    with pytest.raises(ConfigError, match="--format dense"):
        save(q, tmp_path / "x", format="awq")
    assert not (tmp_path / "x").exists()
    model = load_model(tiny_llama)
    q = quantize(model, method="zeropoint", bits=4, group_size=32,
                 targets=TargetConfig(exclude=("k_proj",)))
    qc = AWQFormat().quantization_config(q.config, q.targets, model.arch)
    assert qc["modules_to_not_convert"] == ["model.layers.0.self_attn.k_proj",
                                            "model.layers.1.self_attn.k_proj"]
    # GPTQModel.load ignores modules_to_not_convert; its "dynamic" "-:" rules skip them
    assert qc["dynamic"] == {r"-:^model\.layers\.0\.self_attn\.k_proj$": {},
                             r"-:^model\.layers\.1\.self_attn\.k_proj$": {}}
