"""The ``bitsandbytes`` format: round trips, equality with what transformers itself saves, the
real runtime (transformers + bitsandbytes on CPU) loading our files, and refusals."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quantbench.api import quantize, save
from quantbench.cli import main
from quantbench.errors import ConfigError, FormatError
from quantbench.eval.run import artifact_factory
from quantbench.formats.io import open_artifact
from quantbench.models.loader import load_model

bnb_lib = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed "
                              "(pip install -e .[test])")

CASES = [("nf4", {}), ("nf4", {"double_quant": True}), ("fp4", {}),
         ("fp4", {"double_quant": True}), ("llm_int8", {"calib_samples": 2, "calib_len": 64})]


def ids_of(case):
    method, opts = case
    return method + ("-dq" if opts.get("double_quant") else "")


@pytest.fixture(scope="module", params=CASES, ids=ids_of)
def written(request, tiny_llama, tmp_path_factory):
    method, opts = request.param
    model = load_model(tiny_llama)
    q = quantize(model, method=method, **opts)
    out = save(q, tmp_path_factory.mktemp("bnb") / ids_of(request.param), format="bitsandbytes")
    return model, q, out


def test_round_trip_bit_exact(written):
    model, q, out = written
    art = open_artifact(out)
    assert art.format == "bitsandbytes" and sorted(art.quantized_names) == sorted(q.targets)
    for name in q.targets:
        expect = q.method.quantize_weight(name, model.weights.get(name)) \
            if q.config.grid.kind == "codebook" else None
        got = art.quantized(name)
        assert got.grid == q.config.grid
        if expect is not None:
            assert got.equal(expect), name
    assert "lm_head.weight" in art.plain_names
    assert dict(art.dequantized()).keys() == set(model.weights.names())


def transformers_saved(source, tmp_path, **bnb_kwargs):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    m = AutoModelForCausalLM.from_pretrained(
        str(source), device_map="cpu", quantization_config=BitsAndBytesConfig(**bnb_kwargs))
    m.save_pretrained(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("method,opts,bnb_kwargs", [
    ("nf4", {"double_quant": True}, {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                     "bnb_4bit_use_double_quant": True}),
    ("fp4", {}, {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}),
    ("llm_int8", {"calib_samples": 2, "calib_len": 64}, {"load_in_8bit": True}),
])
def test_files_equal_what_transformers_saves(tiny_llama, tmp_path, method, opts, bnb_kwargs):
    """Quantizing in transformers + bitsandbytes and saving gives the same tensors, byte for
    byte, and the same quantization_config (its reader then reads that file like ours)."""
    ref_dir = transformers_saved(tiny_llama, tmp_path / "hf", **bnb_kwargs)
    ours = save(quantize(load_model(tiny_llama), method=method, **opts), tmp_path / "ours",
                format="bitsandbytes")
    ref, got = load_file(str(ref_dir / "model.safetensors")), {}
    for f in sorted(ours.glob("*.safetensors")):
        got.update(load_file(str(f)))
    assert sorted(ref) == sorted(got)
    for key in ref:
        assert ref[key].dtype == got[key].dtype and torch.equal(ref[key], got[key]), key
    qc_ref = json.loads((ref_dir / "config.json").read_text())["quantization_config"]
    qc = json.loads((ours / "config.json").read_text())["quantization_config"]
    assert qc == qc_ref
    theirs = open_artifact(ref_dir)
    assert theirs.format == "bitsandbytes"
    for name in theirs.quantized_names:
        assert theirs.quantized(name).equal(open_artifact(ours).quantized(name)), name


@pytest.mark.parametrize("case", CASES, ids=ids_of)
def test_transformers_runs_our_file_with_our_logits(tiny_llama, tmp_path, case,
                                                    bnb_reference_path):
    """Real runtime: transformers + bitsandbytes (CPU) load our file; with the float layers in
    float32 its logits equal our evaluator's exactly, LLM.int8's outlier decomposition included."""
    from transformers import AutoModelForCausalLM

    method, opts = case
    out = save(quantize(load_model(tiny_llama), method=method, **opts), tmp_path / "o",
               format="bitsandbytes")
    hf = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu")
    kind = "Linear8bitLt" if method == "llm_int8" else "Linear4bit"
    assert type(hf.model.layers[0].self_attn.q_proj).__name__ == kind
    for p in hf.parameters():
        if p.dtype == torch.float16:
            p.data = p.data.float()
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    ids[0, :8] = 7
    # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights at the first inference call
    # and multiplies in bfloat16 (a fused kernel); our evaluator follows its reference path
    # (dequantize, then compute in the layer's dtype). Compare exactly on the reference path,
    # and the fused one within bfloat16 rounding.
    fused = bnb_reference_path(hf)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
    ours = artifact_factory(open_artifact(out))()(ids).float()
    assert torch.equal(ours, ref), (ours - ref).abs().max()
    if fused:
        for m in fused:
            m.support_avx512bf16_for_cpu = True
        with torch.no_grad():
            bf16 = hf(input_ids=ids).logits.float()
        assert (bf16 - ref).abs().max() <= 0.03 * ref.abs().max()


def test_llm_int8_evaluation_reflects_the_decomposition(tiny_llama, tmp_path):
    """The int8 artifact is evaluated with the mixed matmul (threshold from its config); a
    threshold low enough to catch real columns changes the logits versus no decomposition,
    and the dense copy of the same weights is a plain matmul."""
    q = quantize(load_model(tiny_llama), method="llm_int8", threshold=0.5, calib_samples=2,
                 calib_len=64)
    out = save(q, tmp_path / "int8", format="bitsandbytes")
    dense = save(q, tmp_path / "dense", format="dense")
    art = open_artifact(out)
    assert art.runtime == {"llm_int8_threshold": 0.5}
    ids = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(1))
    mixed = artifact_factory(art)()(ids)
    art.runtime = {"llm_int8_threshold": 0.0}
    plain_int8 = artifact_factory(art)()(ids)
    plain = artifact_factory(open_artifact(dense))()(ids)
    assert not torch.equal(mixed, plain_int8)
    assert not torch.equal(mixed, plain)
    manifest = json.loads((out / "quantbench.json").read_text())
    stats = manifest["tensors"]["model.layers.0.self_attn.q_proj.weight"]["stats"]
    assert 0 <= stats["outlier_fraction"] <= 1 and stats["outlier_columns"] >= 0


def test_missing_quant_state_is_a_clear_error(tiny_llama, tmp_path):
    out = save(quantize(load_model(tiny_llama), method="nf4"), tmp_path / "nf4",
               format="bitsandbytes")
    shard = out / "model.safetensors"
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    del tensors[key]
    save_file(tensors, str(shard), {"format": "pt"})
    with pytest.raises(FormatError, match="no weight.quant_state"):
        open_artifact(out)


def test_threshold_in_config_must_be_a_number(tiny_llama, tmp_path):
    out = save(quantize(load_model(tiny_llama), method="llm_int8", calib_samples=2,
                        calib_len=64), tmp_path / "i8", format="bitsandbytes")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["llm_int8_threshold"] = "six"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="not a number"):
        open_artifact(out)


@pytest.mark.parametrize("args,match", [
    (["--method", "nf4", "--group-size", "48"], "block size) must be one of 32, 64"),
    (["--method", "nf4", "--bits", "3"], "nf4 stores 4-bit codes"),
    (["--method", "llm_int8", "--threshold", "-1"], "threshold must be a number >= 0"),
    (["--method", "llm_int8", "--threshold", "abc"], "abc"),
    (["--method", "zeropoint", "-g", "32"], "use --method nf4, fp4 or llm_int8"),
    (["--method", "nf4", "--quantize-lm-head"], "lm_head"),
])
def test_cli_refusals_leave_nothing(tiny_llama, tmp_path, assert_nothing_written, capsys,
                                   args, match):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(tiny_llama), "--format", "bitsandbytes", "-o", str(out), *args])
    assert exc.value.code != 0
    assert match in capsys.readouterr().err
    assert_nothing_written(out)


def test_other_formats_refuse_bnb_grids(tiny_llama):
    from quantbench.formats.gptq import GPTQFormat
    from quantbench.quant.run import make_config, quantize as run_quantize

    model = load_model(tiny_llama)
    q = run_quantize(model, make_config("nf4"))
    with pytest.raises(ConfigError, match="nf4"):
        GPTQFormat().check(q.config, model, q.targets)


def test_dense_copies(tiny_llama, tmp_path):
    model = load_model(tiny_llama)
    for method in ("nf4", "llm_int8"):
        q = quantize(model, method=method, calib_samples=2, calib_len=64) \
            if method == "llm_int8" else quantize(model, method=method)
        out = save(q, tmp_path / method, format="dense")
        art = open_artifact(out)
        name = q.targets[0]
        expect = q.method.quantize_weight(name, model.weights.get(name)) \
            if method == "nf4" else None
        if expect is not None:
            assert torch.equal(art.weights.get(name), expect.dequantize(torch.float16))


def test_cli_llm_int8_reports_outlier_columns(tiny_llama, tmp_path, capsys):
    out = tmp_path / "i8"
    main(["convert", str(tiny_llama), "--method", "llm_int8", "--threshold", "0.5",
          "--calib-samples", "2", "--calib-len", "64", "--format", "bitsandbytes", "-o", str(out)])
    text = capsys.readouterr().out
    assert "outlier columns (calibration |x| >= 0.5)" in text
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["llm_int8_threshold"] == 0.5 and qc["load_in_8bit"] is True
