import json
from types import SimpleNamespace

import pytest
import torch

from quantbench.api import quantize, save
from quantbench.config import IntGridConfig, TargetConfig
from quantbench.errors import ConfigError, FormatError
from quantbench.formats.gptq import GPTQFormat, gptq_decode, gptq_encode
from quantbench.formats.io import open_artifact
from quantbench.models.arch import LLAMA
from quantbench.models.loader import load_model
from quantbench.quant.methods.rtn import rtn_quantize
from quantbench.quant.run import make_config
from quantbench.tensor import QuantizedTensor

CASES = [("absmax", 4, 32), ("zeropoint", 4, 32), ("absmax", 8, -1), ("zeropoint", 3, 32),
         ("absmax", 2, 16)]


def ref_unpack_rows(qweight: torch.Tensor, bits: int, n: int) -> list[list[int]]:
    """Independent reading of FORMATS.md §1.3 for qweight ``[in*b/32, out]`` → ``[out][in]``."""
    words = [[int(v) & 0xFFFFFFFF for v in row] for row in qweight.tolist()]
    out = [[0] * n for _ in range(len(words[0]))]
    for col in range(len(words[0])):
        for i in range(n):
            if bits == 3:  # 32 values in 3 words: 10 | 1-bit spill | 10 | 2-bit spill | 10
                w0, w1, w2 = (words[3 * (i // 32) + k][col] for k in range(3))
                j = i % 32
                if j < 10:
                    v = (w0 >> (3 * j)) & 7
                elif j == 10:
                    v = ((w0 >> 30) & 3) | ((w1 & 1) << 2)
                elif j < 21:
                    v = (w1 >> (1 + 3 * (j - 11))) & 7
                elif j == 21:
                    v = ((w1 >> 31) & 1) | ((w2 & 3) << 1)
                else:
                    v = (w2 >> (2 + 3 * (j - 22))) & 7
            else:  # word r holds rows r*(32/b) + j at bits b*j
                per = 32 // bits
                v = 0
                for bit in range(bits):
                    v |= ((words[i // per][col] >> (bits * (i % per) + bit)) & 1) << bit
            out[col][i] = v
    return out


@pytest.mark.parametrize("method,bits,group", CASES)
def test_round_trip_bit_exact(write_tiny, method, bits, group):
    w = write_tiny("gptq", method=method, bits=bits, group_size=group)
    model, q, out, art = w.model, w.q, w.out, w.art
    w.assert_quantized_like_rtn()
    for name in q.targets:
        expect = w.rtn_reference(name)
        got = art.quantized(name)
        assert got.equal(expect) and got.g_idx is None, name
        module = name[: -len(".weight")]
        out_f, in_f = expect.shape
        assert art.weights.shape(f"{module}.qweight") == (in_f * bits // 32, out_f)
        assert art.weights.shape(f"{module}.scales") == (expect.scales.shape[1], out_f)
        assert art.weights.get(f"{module}.g_idx").dtype == torch.int32
    assert "lm_head.weight" in art.plain_names
    assert not any(n.endswith((".qzeros", ".scales", ".g_idx")) for n in art.plain_names)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    sym = method == "absmax"
    assert qc["quant_method"] == "gptq" and qc["bits"] == bits and qc["group_size"] == group
    assert qc["sym"] == sym and qc["checkpoint_format"] == qc["format"] == (
        "gptq" if sym else "gptq_v2")
    assert qc["meta"]["quantizer"][0].startswith("quantbench:") and "dynamic" not in qc
    assert dict(art.dequantized()).keys() == set(model.weights.names())


def test_quantize_config_json(tiny_llama, tmp_path):
    model = load_model(tiny_llama)
    q = quantize(model, method="absmax", bits=4, group_size=32)
    fmt = GPTQFormat()
    qc = fmt.quantization_config(q.config, q.targets, model.arch)
    out = save(q, tmp_path / "gptq", format="gptq")
    assert json.loads((out / "quantize_config.json").read_text()) == qc
    assert json.loads((out / "config.json").read_text())["quantization_config"] == qc


def test_excluded_linears_are_listed_as_dynamic_skips(tiny_llama):
    model = load_model(tiny_llama)
    q = quantize(model, method="absmax", bits=4, group_size=32,
                 targets=TargetConfig(exclude=(r"down_proj",)))
    qc = GPTQFormat().quantization_config(q.config, q.targets, model.arch)
    assert set(qc["dynamic"]) == {r"-:^model\.layers\.0\.mlp\.down_proj$",
                                  r"-:^model\.layers\.1\.mlp\.down_proj$"}


def test_v1_symmetric_zeros_are_0x77777777(tiny_llama, tmp_path):
    model = load_model(tiny_llama)
    q = quantize(model, method="absmax", bits=4, group_size=32)
    art = open_artifact(save(q, tmp_path / "gptq", format="gptq"))
    qzeros = art.weights.get("model.layers.0.self_attn.q_proj.qzeros")
    assert qzeros.dtype == torch.int32 and bool((qzeros == 0x77777777).all())


def test_independent_unpacker_agrees():
    """qweight decoded with a spec-following loop equals the codes (3 and 4 bit)."""
    gen = torch.Generator().manual_seed(0)
    for bits in (3, 4, 2, 8):
        grid = IntGridConfig(bits=bits, symmetric=False, granularity="group", group_size=32)
        codes = torch.randint(0, 1 << bits, (8, 64), generator=gen).to(torch.uint8)
        zeros = torch.randint(0, 1 << bits, (8, 2), generator=gen).to(torch.int32)
        qt = QuantizedTensor(codes, torch.rand(8, 2, generator=gen).half(), zeros, grid)
        parts = gptq_encode(qt)
        assert parts["qweight"].shape == (64 * bits // 32, 8)
        assert ref_unpack_rows(parts["qweight"], bits, 64) == codes.tolist()
        if 8 * bits % 32 == 0:  # v2 zeros stored as they are, packed along the output dim
            stored = ref_unpack_rows(parts["qzeros"].t().contiguous(), bits, 8)
            assert stored == zeros.t().tolist()


def test_v2_zeros_unmodified_and_v1_adds_one():
    gen = torch.Generator().manual_seed(1)
    grid = IntGridConfig(bits=4, symmetric=False, granularity="group", group_size=16)
    codes = torch.randint(0, 16, (32, 64), generator=gen).to(torch.uint8)
    zeros = torch.randint(0, 16, (32, 4), generator=gen).to(torch.int32)
    zeros[0, 0] = 0
    qt = QuantizedTensor(codes, torch.rand(32, 4, generator=gen).half(), zeros, grid)
    parts = gptq_encode(qt)
    word = int(parts["qzeros"][0, 0]) & 0xFFFFFFFF
    assert [(word >> 4 * j) & 15 for j in range(8)] == zeros[:8, 0].tolist()
    # a v1 file with asymmetric zeros, built by hand: stored 0..15, loaders compute stored + 1
    stored = torch.arange(32, dtype=torch.int32).reshape(1, 32).expand(4, 32) % 16
    words = [sum(int(stored[g, 8 * w + j]) << (4 * j) for j in range(8)) for g in range(4)
             for w in range(4)]
    qzeros = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words],
                          dtype=torch.int32).reshape(4, 4)
    v1 = gptq_decode({**parts, "qzeros": qzeros}, 4, 16, sym=False, v1=True)
    assert torch.equal(v1.zeros, stored.t() + 1) and int(v1.zeros.max()) == 16
    assert torch.equal(v1.codes, codes)
    v2 = gptq_decode(parts, 4, 16, sym=False, v1=False)
    assert v2.equal(qt)


@pytest.mark.parametrize("symmetric", [True, False])
def test_act_order_g_idx_preserved(symmetric):
    gen = torch.Generator().manual_seed(2)
    out_f, in_f, g = 32, 128, 32
    perm = torch.randperm(in_f, generator=gen)
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[perm] = (torch.arange(in_f) // g).to(torch.int32)  # group of c = position in perm // g
    grid = IntGridConfig(bits=4, symmetric=symmetric, granularity="group", group_size=g)
    zeros = None if symmetric else torch.randint(0, 16, (out_f, 4), generator=gen).to(torch.int32)
    qt = QuantizedTensor(torch.randint(0, 16, (out_f, in_f), generator=gen).to(torch.uint8),
                         torch.rand(out_f, 4, generator=gen).half(), zeros, grid, g_idx=g_idx)
    back = gptq_decode(gptq_encode(qt), 4, g, sym=symmetric, v1=symmetric)
    assert back.equal(qt) and torch.equal(back.g_idx, g_idx)
    assert torch.equal(back.dequantize(), qt.dequantize())


def test_reads_autogptq_style_config(tiny_llama, tmp_path):
    """No manifest, no quantization_config in config.json: quantize_config.json with the
    legacy aliases and ``format`` instead of ``checkpoint_format``."""
    model = load_model(tiny_llama)
    q = quantize(model, method="absmax", bits=4, group_size=32)
    out = save(q, tmp_path / "gptq", format="gptq")
    (out / "quantbench.json").unlink()
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))
    (out / "quantize_config.json").write_text(json.dumps(
        {"w_bit": 4, "q_group_size": 32, "desc_act": False, "sym": True, "format": "gptq"}))
    art = open_artifact(out)
    assert art.format == "gptq"
    name = q.targets[0]
    assert art.quantized(name).equal(
        rtn_quantize(model.weights.get(name), q.config.grid, torch.float16))


def test_refuses_unsupported_checkpoint_format(tiny_llama, tmp_path):
    q = quantize(str(tiny_llama), method="absmax", bits=4, group_size=32)
    out = save(q, tmp_path / "gptq", format="gptq")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "marlin"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="'gptq_v2'"):
        open_artifact(out)


@pytest.mark.parametrize("bits,group,match", [(4, 0, "--group-size 128"), (5, 32, "--bits 4")])
def test_refusals_leave_no_output(tiny_llama, tmp_path, assert_nothing_written,
                                  bits, group, match):
    q = quantize(str(tiny_llama), method="absmax", bits=bits, group_size=group)
    with pytest.raises(ConfigError, match=match) as exc:
        save(q, tmp_path / "x", format="gptq")
    assert "\n" not in str(exc.value)
    assert_nothing_written(tmp_path / "x")


def test_refuses_embeddings(tiny_llama_tied, tmp_path):
    q = quantize(str(tiny_llama_tied), method="absmax", bits=8, group_size=-1,
                 targets=TargetConfig(lm_head=True))
    with pytest.raises(ConfigError, match="--format dense"):
        save(q, tmp_path / "x", format="gptq")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("bits,shape", [(4, (64, 100)), (3, (64, 48)), (2, (24, 64))])
def test_refuses_shapes_the_packing_cannot_hold(bits, shape):
    config = make_config("absmax", bits, -1)
    model = SimpleNamespace(arch=LLAMA, weights=SimpleNamespace(shape=lambda name: shape))
    with pytest.raises(ConfigError, match="compressed-tensors"):
        GPTQFormat().check(config, model, ["model.layers.0.mlp.up_proj.weight"])
