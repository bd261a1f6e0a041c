"""EXL2 format: a bit-by-bit reader written from FORMATS.md §4 alone checks our writer; the
tiny model round-trips; damaged files and impossible combinations give clear errors."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from quantbench.api import quantize, save
from quantbench.config import EXL2GridConfig
from quantbench.errors import ConfigError, FormatError
from quantbench.formats.exl2 import exl2_decode, exl2_encode
from quantbench.formats.io import open_artifact
from quantbench.models.loader import load_model
from quantbench.quant.exl2.grid import group_layout
from quantbench.tensor import QuantizedTensor

MIXES = ["1:8b_32g", "1:6b_32g", "1:5b_32g", "1:4b_32g", "1:3b_32g", "1:2b_32g",
         "0.1:5b_32g/0.9:4b_128g", "0.05:8b_32g/0.2:6b_64g/0.25:3b_64g/0.5:2b_32g",
         "0.3:6b_64g/0.7:5b_96g"]
CALIB = {"calib_samples": 4, "calib_len": 32}


def spec_dequantize(parts: dict, out_f: int) -> np.ndarray:
    """FORMATS.md §4 read bit by bit: ``q_groups`` gives (bits, first q_weight row) per group;
    each column of a group is a little-endian bit string along its q_weight rows; scale codes
    are nibbles (+1) along the columns; scale = fp16(qs²)·fp16(q_scale_max/256) in fp16;
    weight = fp16((q − 2^(b−1))·scale); processing row r holds input column perm[r], and
    q_invperm[i] is the row of input i."""
    words = (parts["q_weight"].to(torch.int64) & 0xFFFFFFFF).tolist()
    pairs = parts["q_groups"].tolist()
    pairs = [(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)]
    nibble_words = (parts["q_scale"].to(torch.int64) & 0xFFFFFFFF).tolist()
    q_max = parts["q_scale_max"].numpy()
    invperm = parts["q_invperm"].tolist()
    in_f = len(invperm)
    row_of_input = invperm
    input_of_row = [0] * in_f
    for i, r in enumerate(row_of_input):
        input_of_row[r] = i
    out = np.zeros((out_f, in_f), dtype=np.float32)
    row = 0
    for g, (bits, start) in enumerate(pairs):
        if g + 1 < len(pairs):
            rows = (pairs[g + 1][1] - start) * 32 // bits
        else:
            rows = in_f - row
        for c in range(out_f):
            qs = ((nibble_words[g][c // 8] >> (4 * (c % 8))) & 0xF) + 1
            scale = np.float16(np.float16(qs * qs) * np.float16(q_max[g] / np.float16(256)))
            for k in range(rows):
                q = 0
                for bit in range(bits):
                    p = k * bits + bit
                    q |= ((words[start + p // 32][c] >> (p % 32)) & 1) << bit
                w = np.float16(np.float16(q - (1 << (bits - 1))) * scale)
                out[c, input_of_row[row + k]] = w
        row += rows
    assert row == in_f
    return out


def random_qt(desc: str, out_f: int, in_f: int, seed: int) -> QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    grid = EXL2GridConfig.from_desc(desc)
    layout = group_layout(grid, in_f)
    perm = torch.randperm(in_f, generator=g)
    rows = [torch.randint(0, 1 << b, (out_f, 1), generator=g) for b, n in layout for _ in range(n)]
    codes = torch.empty(out_f, in_f, dtype=torch.uint8)
    codes[:, perm] = torch.cat(rows, dim=1).to(torch.uint8)
    qscale = torch.randint(1, 17, (out_f, len(layout)), generator=g).to(torch.uint8)
    qmax = (torch.rand(len(layout), generator=g) * 0.1 + 1e-3).half()
    return QuantizedTensor(codes=codes, scales=qscale, zeros=None, grid=grid,
                           perm=perm.to(torch.int32), aux={"q_scale_max": qmax})


@pytest.mark.parametrize("desc", MIXES)
@pytest.mark.parametrize("out_f", [32, 40])
def test_independent_reader_agrees_with_our_packer(desc, out_f):
    qt = random_qt(desc, out_f, 192, seed=len(desc) + out_f)
    parts = exl2_encode(qt)
    assert parts["q_weight"].shape[1] == 32 * -(-out_f // 32)
    assert parts["q_weight"].shape[0] == sum(n * b // 32 for b, n in group_layout(qt.grid, 192))
    assert (parts["q_weight"].dtype, parts["q_scale"].dtype, parts["q_scale_max"].dtype,
            parts["q_groups"].dtype, parts["q_invperm"].dtype) == (
        torch.int32, torch.int32, torch.float16, torch.int16, torch.int32)
    assert np.array_equal(spec_dequantize(parts, out_f), qt.dequantize().numpy())
    back = exl2_decode(parts, out_f, qt.grid)
    assert back.equal(qt)
    derived = exl2_decode(parts, out_f)          # no manifest: the mix comes from q_groups
    assert group_layout(derived.grid, 192) == group_layout(qt.grid, 192)
    assert torch.equal(derived.dequantize(), qt.dequantize())


def test_padding_columns_hold_zero_codes_and_full_nibbles():
    qt = random_qt("0.1:5b_32g/0.9:4b_128g", 40, 192, seed=3)
    parts = exl2_encode(qt)
    nibbles = (parts["q_scale"].to(torch.int64) & 0xFFFFFFFF)
    assert int(nibbles[0, 5]) & 0xFFFF0000 == 0xFFFF0000        # columns 44..47 of word 5
    words = parts["q_weight"][0:5, 40:].to(torch.int64) & 0xFFFFFFFF   # the 5-bit group
    stream = sum(int(words[w, 0]) << (32 * w) for w in range(5))
    assert all((stream >> (5 * k)) & 31 == 16 for k in range(32))   # code 2^(b−1): weight 0


@pytest.fixture
def exl2_tiny(tiny_llama, tmp_path):
    model = load_model(tiny_llama)
    q = quantize(model, method="exl2", bits=4, group_size=32, **CALIB)
    out = save(q, tmp_path / "exl2", format="exl2")
    return model, q, out


def test_tiny_model_round_trips_bit_exactly(exl2_tiny, tmp_path):
    model, q, out = exl2_tiny
    art = open_artifact(out)
    assert art.format == "exl2" and sorted(art.quantized_names) == sorted(q.targets)
    stored = load_file(str(out / "model.safetensors"))
    deq = dict(art.dequantized())
    assert deq.keys() == set(model.weights.names())
    for name in q.targets:
        module = name[: -len(".weight")]
        qt = art.quantized(name)
        assert qt.grid == EXL2GridConfig((4,), (1.0,), (32,))
        parts = {k: stored[f"{module}.{k}"] for k in exl2_encode(qt)}
        for key, tensor in exl2_encode(qt).items():   # re-encoding gives the same bytes
            assert tensor.dtype == parts[key].dtype and torch.equal(tensor, parts[key]), key
        assert np.array_equal(spec_dequantize(parts, qt.shape[0]), deq[name].numpy())
        assert qt.bits_per_weight() == pytest.approx(
            (qt.numel * 4 + 2 * qt.shape[1] // 32 * (16 + 32 + 4 * qt.shape[0]) / 2
             + 32 * qt.shape[1]) / qt.numel)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "exl2" and qc["bits"] == 4.0 and qc["head_bits"] == 16
    assert qc["calibration"] == {"rows": 4, "length": 32,
                                 "dataset": "c4-validation-head1025.jsonl.gz"}
    bare = tmp_path / "bare"                      # as exllamav2 leaves it: no manifest
    shutil.copytree(out, bare)
    (bare / "quantbench.json").unlink()
    again = open_artifact(bare)
    assert again.format == "exl2"
    assert all(torch.equal(t, deq[n]) for n, t in again.dequantized())


def test_damaged_files_are_refused(exl2_tiny, tmp_path):
    _, q, out = exl2_tiny
    module = q.targets[0][: -len(".weight")]
    for label, edit, needle in [
        ("missing", lambda t: t.pop(f"{module}.q_scale"),
         r"lacks \S*q_scale; the checkpoint is incomplete"),
        ("ascending", lambda t: t[f"{module}.q_groups"].copy_(
            torch.tensor([2, 0, 4, 8], dtype=torch.int16)), "do not fit together"),
        ("short", lambda t: t.__setitem__(f"{module}.q_weight", t[f"{module}.q_weight"][:-1]),
         "do not fit together"),
    ]:
        bad = tmp_path / label
        shutil.copytree(out, bad)
        (bad / "quantbench.json").unlink()
        tensors = load_file(str(bad / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(bad / "model.safetensors"), {"format": "pt"})
        with pytest.raises(FormatError, match=needle):
            dict(open_artifact(bad).dequantized())


@pytest.mark.parametrize("kwargs,fmt,needle", [
    ({"method": "absmax", "bits": 4, "group_size": 32}, "exl2", "exl2 stores EXL2 mixes"),
    ({"method": "exl2", "bits": 4, "group_size": 32, **CALIB}, "gptq", "--format exl2"),
    ({"method": "exl2", "bits": 4, "group_size": 32, **CALIB}, "awq", "--format exl2"),
])
def test_impossible_combinations_write_nothing(tiny_llama, tmp_path, assert_nothing_written,
                                               kwargs, fmt, needle):
    q = quantize(load_model(tiny_llama), **kwargs)
    out = tmp_path / "x"
    with pytest.raises(ConfigError, match=needle):
        save(q, out, format=fmt)
    assert_nothing_written(out)


def test_dense_holds_the_exl2_weights(exl2_tiny, tmp_path):
    model, _, out = exl2_tiny
    q = quantize(model, method="exl2", bits=4, group_size=32, **CALIB)
    dense = open_artifact(save(q, tmp_path / "dense", format="dense"))
    exl2 = dict(open_artifact(out).dequantized())
    for name, t in dense.dequantized():
        assert torch.equal(t.float(), exl2[name].float()), name
