"""Class 2: NaN/Inf never passes silently.

A non-finite value in a source weight is refused naming the tensor, wherever the weight is
read (convert, eval of the source, the Python API), in every float dtype and every kind of
tensor; ``--allow-non-finite`` keeps such tensors as they are, unquantized, with a warning
naming them. Quantizer outputs and calibration are guarded too: scales that overflow their
storage dtype, a calibration statistic or activations holding NaN/Inf are errors naming the
tensor or the block, never codes.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import make_tiny_llama
from tests.faults.conftest import assert_no_leftovers, assert_refused

ST = "model.safetensors"
TENSORS = {"embeddings": "model.embed_tokens.weight",
           "linear": "model.layers.1.self_attn.v_proj.weight",
           "norm": "model.layers.0.post_attention_layernorm.weight"}
VALUES = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CALIB = ("--calib-samples", 2, "--calib-len", 32)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    """One tiny llama per dtype, made once for the module."""
    import shutil

    root = tmp_path_factory.mktemp("non-finite")
    made = {"fp16": make_tiny_llama(root / "fp16")}
    for name in ("bf16", "fp32"):  # the tokenizer copied, not trained again
        made[name] = make_tiny_llama(root / name, dtype=DTYPES[name], tokenizer=False)
        for f in made["fp16"].glob("*token*"):
            shutil.copy(f, made[name] / f.name)
    return made


def damaged(pristine, tmp_path: Path, dtype: str, edits: dict[str, float]) -> Path:
    """A copy of the ``dtype`` tiny llama with ``edits`` (tensor → value) put at a few
    positions of each tensor."""
    import shutil

    src = tmp_path / f"src-{dtype}"
    shutil.copytree(pristine[dtype], src)
    tensors = load_file(str(src / ST))
    for name, value in edits.items():
        flat = tensors[name].view(-1)
        flat[[1, flat.numel() // 2]] = value
    save_file(tensors, str(src / ST), {"format": "pt"})
    return src


# every dtype meets every value, and every tensor kind meets every dtype and every value
CASES = [(d, v, t) for i, d in enumerate(DTYPES) for j, v in enumerate(VALUES)
         for t in [list(TENSORS)[(i + j) % 3]]]


@pytest.mark.parametrize("dtype,value,tensor", CASES)
def test_non_finite_source_weight_is_refused(dtype, value, tensor, qb, pristine, tmp_path):
    src = damaged(pristine, tmp_path, dtype, {TENSORS[tensor]: VALUES[value]})
    kind = "NaN" if value == "nan" else value.replace("inf", "Inf")
    out = tmp_path / "outputs"
    assert_refused(qb("convert", src, "-o", out / "q", "-g", 32), TENSORS[tensor],
                   f"2 non-finite values (2 {kind})", "--allow-non-finite")
    assert_no_leftovers(out)


def test_several_damaged_tensors_name_the_first_read(qb, pristine, tmp_path):
    src = damaged(pristine, tmp_path, "bf16", {TENSORS["linear"]: math.nan,
                                               TENSORS["norm"]: math.inf})
    assert_refused(qb("convert", src, "-o", tmp_path / "q", "--method", "absmax", "-g", 32),
                   "model.layers.0.post_attention_layernorm.weight")


def test_eval_of_a_non_finite_source_is_refused(qb, pristine, tmp_path):
    src = damaged(pristine, tmp_path, "fp16", {TENSORS["norm"]: math.nan})
    assert_refused(qb("eval", src, "--ctx", 64, "--max-tokens", 256, "--no-cache"),
                   TENSORS["norm"], "NaN")


def test_allow_non_finite_keeps_those_tensors_unquantized(qb, pristine, tmp_path, caplog):
    """The opt-in: the tensors holding NaN/Inf are written as they are (not quantized), a
    warning names them and how many values; every other target is quantized."""
    import json

    linear = TENSORS["linear"]
    src = damaged(pristine, tmp_path, "fp16", {linear: math.nan, TENSORS["norm"]: -math.inf})
    result = qb("convert", src, "-o", tmp_path / "q", "-g", 32, "--allow-non-finite")
    assert result.code == 0, result.stderr
    assert f"not quantizing {linear}: it holds 2 non-finite values" in caplog.text
    assert f"{TENSORS['norm']} holds 2 non-finite values (2 -Inf)" in caplog.text
    written = load_file(str(tmp_path / "q" / ST))
    source = load_file(str(src / ST))
    for name in (linear, TENSORS["norm"]):  # bit for bit as in the source, NaN included
        assert torch.equal(written[name].view(torch.int16), source[name].view(torch.int16))
    tensors = json.loads((tmp_path / "q" / "quantbench.json").read_text())["tensors"]
    assert not tensors[linear]["quantized"]
    assert tensors["model.layers.0.self_attn.v_proj.weight"]["quantized"]


def test_allow_non_finite_in_the_python_api(pristine, tmp_path):
    import quantbench as qb_api
    from quantbench.errors import ModelLoadError

    src = damaged(pristine, tmp_path, "bf16", {TENSORS["linear"]: math.inf})
    with pytest.raises(ModelLoadError, match="v_proj.weight"):
        qb_api.quantize(str(src), method="absmax", bits=8, group_size=32)
    q = qb_api.quantize(str(src), method="absmax", bits=8, group_size=32,
                        allow_non_finite=True)
    assert TENSORS["linear"] not in q.targets and q.targets
    model = qb_api.load_model(src, allow_non_finite=True)
    assert torch.isinf(model.weights.get(TENSORS["linear"])).sum() == 2


def test_allow_non_finite_with_calibration_names_the_block(qb, pristine, tmp_path):
    """Kept NaN weights poison the calibration activations: an error naming the block and the
    tensor, not codes fitted to NaN."""
    src = damaged(pristine, tmp_path, "fp32", {"model.layers.0.mlp.down_proj.weight": math.nan})
    assert_refused(qb("convert", src, "-o", tmp_path / "q", "--method", "gptq", "-g", 32,
                      "--allow-non-finite", *CALIB),
                   "entering block 1", "model.layers.0.mlp.down_proj.weight")
    assert_no_leftovers(tmp_path, keep=("src-fp32",))


def _scaled(pristine, tmp_path, dtype: str, name: str, value: float) -> Path:
    import shutil

    src = tmp_path / f"src-{dtype}"
    shutil.copytree(pristine[dtype], src)
    tensors = load_file(str(src / ST))
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(src / ST), {"format": "pt"})
    return src


@pytest.mark.parametrize("args,needles", [
    (("--method", "zeropoint", "-g", 32), ["non-finite scales", "float16"]),
    (("--method", "absmax", "--bits", 8, "-g", -1), ["non-finite scales"]),
    (("--type", "Q8_0"), ["non-finite block scales"]),
])
def test_scales_overflowing_their_dtype_are_an_error(args, needles, qb, pristine, tmp_path):
    """A finite fp32 weight beyond fp16's range: its fp16 scales (or a GGUF block's) would be
    Inf; refused naming the tensor instead of writing Inf scales."""
    name = "model.layers.0.self_attn.q_proj.weight"
    src = _scaled(pristine, tmp_path, "fp32", name, 1e38)
    out = tmp_path / "outputs"
    assert_refused(qb("convert", src, "-o", out / "q", *args), name, *needles)
    assert_no_leftovers(out)


def test_calibration_statistic_overflow_names_tensor_and_block(qb, pristine, tmp_path):
    """Finite weights whose activations overflow float32 inside a block: the Hessian holds
    Inf; refused naming the tensor and the block (not a linear-algebra failure)."""
    norm = "model.layers.0.post_attention_layernorm.weight"
    src = _scaled(pristine, tmp_path, "fp32", norm, 1e38)
    load = load_file(str(src / ST))
    load[norm].fill_(1e38)
    save_file(load, str(src / ST), {"format": "pt"})
    assert_refused(qb("convert", src, "-o", tmp_path / "q", "--method", "gptq", "-g", 32,
                      *CALIB), "calibration statistic", "mlp.gate_proj.weight", "block 0")


def test_calibration_activations_overflow_names_the_block(qb, pristine, tmp_path):
    """Block 0's output beyond float32 (its down_proj kept unquantized): block 1's inputs are
    Inf; refused naming block 1."""
    src = _scaled(pristine, tmp_path, "fp32", "model.layers.0.mlp.down_proj.weight", 0.0)
    tensors = load_file(str(src / ST))
    tensors["model.layers.0.mlp.down_proj.weight"].fill_(3e38)
    tensors["model.layers.0.post_attention_layernorm.weight"].fill_(1e3)
    save_file(tensors, str(src / ST), {"format": "pt"})
    assert_refused(qb("convert", src, "-o", tmp_path / "q", "--method", "gptq", "-g", 32,
                      "--exclude", r"layers\.0\.mlp", *CALIB),
                   "entering block 1", "block 0 overflows")


def test_artifact_with_non_finite_scales_is_refused(qb, pristine, tmp_path):
    """An artifact whose stored scales were damaged to NaN: refused when read, naming the
    stored tensor (the NaN never reaches a perplexity)."""
    out = tmp_path / "q"
    assert qb("convert", pristine["fp16"], "-o", out, "--format", "gptq", "-g", 32).code == 0
    tensors = load_file(str(out / ST))
    scales = "model.layers.0.mlp.up_proj.scales"
    tensors[scales].view(-1)[3] = math.nan
    save_file(tensors, str(out / ST), {"format": "pt"})
    _rerecord_checksums(out)  # damaged "at the source": the checksums agree with the bytes
    assert_refused(qb("eval", out, "--baseline", pristine["fp16"], "--ctx", 64,
                      "--max-tokens", 256, "--no-cache"), scales, "NaN")


def _rerecord_checksums(out: Path) -> None:
    import json

    from quantbench.formats.manifest import file_table

    manifest = json.loads((out / "quantbench.json").read_text())
    manifest["files"] = file_table(out)
    (out / "quantbench.json").write_text(json.dumps(manifest))


def test_finite_runs_are_untouched(pristine):
    """The guards read, never change: a finite tensor passes through the same object."""
    from quantbench.finite import count_non_finite
    from quantbench.models.loader import load_model

    model = load_model(pristine["bf16"])
    w = model.weights.get(TENSORS["linear"])
    assert count_non_finite(w) == 0
    big = torch.full((4,), 3e38, dtype=torch.float32)  # a sum that overflows, no NaN/Inf
    assert count_non_finite(big) == 0
    assert count_non_finite(torch.tensor([1.0, math.nan, math.inf, -math.inf])) == 3


@pytest.fixture(scope="module")
def tiny_gguf(pristine, tmp_path_factory) -> Path:
    from quantbench.cli import main

    out = tmp_path_factory.mktemp("nf-gguf") / "q"
    try:
        main(["convert", str(pristine["fp16"]), "--type", "Q8_0", "-o", str(out)])
    except SystemExit as exc:
        assert not exc.code
    return out / "model.gguf"


@pytest.mark.parametrize("tensor,hf_name", [
    ("output_norm.weight", "model.norm.weight"),                         # F32 values
    ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),   # a Q8_0 block scale
])
def test_non_finite_gguf_source_is_refused(tensor, hf_name, qb, tiny_gguf, tmp_path,
                                           monkeypatch):
    import gguf

    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    info = next(t for t in gguf.GGUFReader(str(tiny_gguf)).tensors if t.name == tensor)
    data = bytearray(tiny_gguf.read_bytes())
    nan = struct.pack("<f", math.nan) if info.tensor_type.name == "F32" else \
        struct.pack("<e", math.nan)  # the fp16 scale d opening the first Q8_0 block
    data[info.data_offset:info.data_offset + len(nan)] = nan
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(bytes(data))
    out = tmp_path / "outputs"
    assert_refused(qb("convert", bad, "-o", out / "hf"), hf_name, "NaN")
    assert_refused(qb("convert", bad, "-o", out / "q", "-g", 32), hf_name, "NaN")
    assert_no_leftovers(out)
    result = qb("convert", bad, "-o", out / "hf", "--allow-non-finite")
    assert result.code == 0, result.stderr
