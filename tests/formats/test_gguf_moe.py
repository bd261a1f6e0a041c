"""GGUF for mixture-of-experts models (Mixtral: llama.cpp arch ``llama`` with experts;
Qwen3-MoE: ``qwen3moe``) against llama.cpp's own tools.

llama.cpp holds a block's experts of one projection as one 3-D tensor ``blk.N.ffn_*_exps``
(``ne = [cols, rows, experts]``, expert-major, all experts in one type) and the router as
``blk.N.ffn_gate_inp`` (F32, never quantized). Ground truth: the converter of the pinned sdist
(metadata, names, F16/F32 bytes), ``llama-quantize`` (each mixture's types and bytes, also with
our imatrix file), ``llama-perplexity`` (runs our files with our perplexity). The tiny models
(``tests/models/moe_tiny.py``) route top-2 over 6 (Mixtral) / 8 (Qwen3-MoE) experts, expert 0
of layer 0 never routed.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from quantbench.api import quantize, save
from quantbench.formats.gguf_meta import (checkpoint_shapes, expert_part, gguf_metadata,
                                          gguf_tensor_name, hf_tensor_names, tensor_plan)
from quantbench.formats.io import open_artifact
from quantbench.models.arch import arch_of
from quantbench.models.loader import load_model
from quantbench.quant.gguf.mixtures import FILE_TYPES, tensor_types, use_more_bits
from tests.formats.test_gguf_meta import (LEGIT_DIFF, WRAPPER, assert_same_metadata,
                                          field_value,
                                          converter)  # noqa: F401 (a fixture, used by name)
from tests.models.moe_tiny import make_tiny_moe

KINDS = ("mixtral", "qwen3_moe")
OUTTYPES = ["f16", pytest.param("f32", marks=pytest.mark.slow)]  # f32: two more converter runs
ARCH = {"mixtral": "llama", "qwen3_moe": "qwen3moe"}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {kind: make_tiny_moe(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="module")
def reference(converter, tiny, tmp_path_factory):  # noqa: F811
    """``reference(kind, outtype="f16")``: llama.cpp's converter on the tiny model (once)."""
    made: dict[tuple[str, str], Path] = {}
    root = tmp_path_factory.mktemp("moe-ref")

    def get(kind: str, outtype: str = "f16") -> Path:
        if (kind, outtype) not in made:
            made[kind, outtype] = convert(converter, tiny[kind], root / f"{kind}-{outtype}.gguf",
                                          outtype)
        return made[kind, outtype]
    return get


def convert(converter: Path, model_dir: Path, out: Path, outtype: str = "f16") -> Path:
    """llama.cpp's converter (``test_gguf_meta``'s wrapper) on ``model_dir`` → ``out``."""
    script = out.parent / "convert_wrapper.py"
    script.write_text(WRAPPER)
    proc = subprocess.run([sys.executable, str(script), str(converter), str(model_dir),
                           "--outtype", outtype, "--outfile", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def ours(model_dir: Path, gguf_type: str, out: Path, **options) -> Path:
    q = quantize(load_model(model_dir), gguf_type=gguf_type, progress=False,
                 **{"method": "rtn", **options})
    return save(q, out, format="gguf", progress=False) / "model.gguf"


def tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def assert_same_tensors(mine: Path, theirs: Path) -> None:
    """The same tensors, each in the same ggml type, shape and bytes."""
    a, b = tensors(mine), tensors(theirs)
    assert sorted(a) == sorted(b)
    for name, t in b.items():
        assert (a[name].tensor_type, list(a[name].shape)) == (t.tensor_type, list(t.shape)), name
        assert np.asarray(a[name].data).tobytes() == np.asarray(t.data).tobytes(), name


def hf(path: Path):
    """transformers' own model of a checkpoint, in float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def small_config(kind: str, experts: int = 4) -> dict:
    key, size = (("num_local_experts", "intermediate_size") if kind == "mixtral"
                 else ("num_experts", "moe_intermediate_size"))
    return {"model_type": kind, key: experts, "num_experts_per_tok": 2, size: 96,
            "norm_topk_prob": True}


# ----------------------------------------------------------------------------- pure parts

@pytest.mark.parametrize("kind", KINDS)
def test_expert_names_round_trip(kind):
    """An expert's linear ↔ its stacked tensor and index; the router ↔ ffn_gate_inp;
    attention keeps its names."""
    spec = arch_of(small_config(kind))
    for proj, gg in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"),
                     ("down_proj", "ffn_down_exps")):
        name = f"model.layers.1.mlp.experts.3.{proj}.weight"
        assert expert_part(spec, name) == (f"blk.1.{gg}.weight", 3)
        assert gguf_tensor_name(spec, name) == f"blk.1.{gg}.weight"
        assert hf_tensor_names(spec, f"blk.1.{gg}.weight") == [
            f"model.layers.1.mlp.experts.{e}.{proj}.weight" for e in range(4)]
    assert gguf_tensor_name(spec, "model.layers.0.mlp.gate.weight") == \
        "blk.0.ffn_gate_inp.weight"
    assert hf_tensor_names(spec, "blk.0.ffn_gate_inp.weight") == ["model.layers.0.mlp.gate.weight"]
    assert expert_part(spec, "model.layers.0.mlp.gate.weight") is None
    assert gguf_tensor_name(spec, "model.layers.0.self_attn.q_proj.weight") == "blk.0.attn_q.weight"


def _moe_tensors(n_layers: int, n_expert: int, width: int = 256) -> list[tuple[str, tuple]]:
    out = [("token_embd.weight", (width, 320)), ("output.weight", (width, 320)),
           ("output_norm.weight", (width,))]
    for i in range(n_layers):
        out += [(f"blk.{i}.{n}.weight", ne) for n, ne in (
            ("attn_norm", (width,)), ("ffn_norm", (width,)), ("attn_q", (width, width)),
            ("attn_k", (width, 64)), ("attn_v", (width, 64)), ("attn_output", (width, width)),
            ("ffn_gate_inp", (width, n_expert)),
            ("ffn_gate_exps", (width, width, n_expert)), ("ffn_up_exps", (width, width, n_expert)),
            ("ffn_down_exps", (width, width, n_expert)))]
    return out


@pytest.mark.parametrize("n_expert", [6, 8])
def test_mixture_rules_with_experts(n_expert):
    """Q4_K_M as llama-quant.cpp reads for experts: the router stays F32; ffn_down_exps is an
    ffn_down whose layer comes from its name; with 8 experts attn_v and attn_k become Q8_0 and
    attn_output Q5_K (Q3_K_L's attn_output keeps Q3_K then)."""
    got = tensor_types("Q4_K_M", _moe_tensors(8, n_expert), 8, n_head=8, n_head_kv=2,
                       n_expert=n_expert)
    for i in range(8):
        more = use_more_bits(i, 8)
        assert got[f"blk.{i}.ffn_gate_inp.weight"] == "F32"
        assert got[f"blk.{i}.ffn_gate_exps.weight"] == got[f"blk.{i}.ffn_up_exps.weight"] == "Q4_K"
        assert got[f"blk.{i}.ffn_down_exps.weight"] == ("Q6_K" if more else "Q4_K")
        if n_expert == 8:
            assert (got[f"blk.{i}.attn_v.weight"], got[f"blk.{i}.attn_k.weight"],
                    got[f"blk.{i}.attn_output.weight"]) == ("Q8_0", "Q8_0", "Q5_K")
        else:
            assert (got[f"blk.{i}.attn_v.weight"], got[f"blk.{i}.attn_k.weight"],
                    got[f"blk.{i}.attn_output.weight"]) == ("Q6_K" if more else "Q4_K", "Q4_K",
                                                            "Q4_K")
    q3l = tensor_types("Q3_K_L", _moe_tensors(2, n_expert), 2, n_head=8, n_head_kv=2,
                       n_expert=n_expert)
    assert q3l["blk.0.attn_output.weight"] == ("Q3_K" if n_expert == 8 else "Q5_K")


# ------------------------------------------------------------------- against the converter

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("outtype", OUTTYPES)
def test_gguf_matches_converter(kind, outtype, tiny, reference, tmp_path):
    """Our F16 / F32 GGUF is the converter's: every key in its order and value, the stacked
    ``ffn_*_exps`` tensors (``ne = [cols, rows, experts]``) and the F32 router, every tensor's
    type and bytes."""
    ref = reference(kind, outtype)
    reader = gguf.GGUFReader(str(ref))
    config = json.loads((tiny[kind] / "config.json").read_text())
    assert_same_metadata(gguf_metadata(config, tiny[kind], ftype=outtype.upper()), reader)
    plan = tensor_plan(checkpoint_shapes(tiny[kind]), config)
    assert {g: ne for _, g, ne in plan} == {t.name: tuple(int(d) for d in t.shape)
                                           for t in reader.tensors}
    n = arch_of(config).num_experts
    assert reader.fields[f"{ARCH[kind]}.expert_count"].contents() == n
    assert [int(d) for d in tensors(ref)["blk.1.ffn_down_exps.weight"].shape][2] == n
    mine = ours(tiny[kind], outtype.upper(), tmp_path / "ours")
    assert_same_tensors(mine, ref)
    theirs = {k: field_value(f) for k, f in reader.fields.items()
              if not k.startswith("GGUF.") and k not in LEGIT_DIFF}
    written = {k: field_value(f) for k, f in gguf.GGUFReader(str(mine)).fields.items()
               if not k.startswith("GGUF.") and k not in LEGIT_DIFF}
    assert list(written) == list(theirs)
    for key, (value, types) in theirs.items():
        assert written[key][1] == types, key
        assert written[key][0] == value or np.allclose(written[key][0], value), key


@pytest.mark.parametrize("kind", KINDS)
def test_fused_checkpoint_writes_the_same_gguf(kind, tiny, tmp_path):
    """A checkpoint in transformers 5's fused layout (``mlp.experts.gate_up_proj [E, 2I, H]``,
    ``down_proj [E, H, I]``) gives the GGUF of the per-expert one: keys and tensors."""
    fused = make_tiny_moe(kind, tmp_path / tiny[kind].name, fused=True)
    mine, theirs = ours(fused, "Q8_0", tmp_path / "fused"), ours(tiny[kind], "Q8_0",
                                                               tmp_path / "experts")
    assert_same_tensors(mine, theirs)
    keys = [{k: field_value(f) for k, f in gguf.GGUFReader(str(p)).fields.items()
             if not k.startswith("GGUF.")} for p in (mine, theirs)]
    assert keys[0] == keys[1]


def _same_config(got: dict, want: dict) -> None:
    """The keys that shape the model: attention, RoPE, tying, the experts and their sizes,
    renormalised top-k (llama.cpp always renormalises; the tiny Qwen3-MoE does too)."""
    spec = arch_of(want).experts
    keys = ["model_type", "num_attention_heads", "num_key_value_heads", "rope_parameters",
            "tie_word_embeddings", spec.count_key(want), spec.top_k_key, spec.size_key,
            "intermediate_size"] + ([spec.normalize_key] if spec.normalize_key else [])
    assert {k: got.get(k) for k in keys} == {k: want.get(k) for k in keys}

    def head_dim(c: dict) -> int:  # (Mixtral's config leaves it null)
        return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]

    assert head_dim(got) == head_dim(want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("outtype", OUTTYPES)
def test_converter_file_imports_back(kind, outtype, tiny, reference, tmp_path):
    """llama.cpp's F16 / F32 file read back by quantbench: the same experts and their sizes,
    renormalised top-k (llama.cpp always renormalises), the original logits; the stacked
    tensors split back into the checkpoint's per-expert tensors, bit for bit."""
    from quantbench.models.gguf_import import convert_gguf_to_hf

    ref = reference(kind, outtype)
    convert_gguf_to_hf(ref, tmp_path / "back", dtype=torch.float32, tokenizer=False)
    want = json.loads((tiny[kind] / "config.json").read_text())
    _same_config(json.loads((tmp_path / "back" / "config.json").read_text()), want)
    ids = torch.randint(0, 320, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(hf(tmp_path / "back")(ids).logits,
                                   hf(tiny[kind])(ids).logits, rtol=1e-4, atol=1e-4)
    convert_gguf_to_hf(ref, tmp_path / "f16", tokenizer=False)
    original = load_file(str(tiny[kind] / "model.safetensors"))
    back = load_file(str(tmp_path / "f16" / "model.safetensors"))
    assert sorted(back) == sorted(original)  # Mixtral's stored names (block_sparse_moe.*.w1)
    for name, w in original.items():
        assert torch.equal(back[name], w), name
    model = load_model(ref)  # a GGUF as a source: the import, loaded as the family
    assert model.arch.family == kind and model.arch.num_experts == arch_of(want).num_experts


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gguf_type", ["F32", "F16", "Q8_0", "Q4_K_M"])
def test_our_gguf_imports_back(kind, gguf_type, tiny, tmp_path):
    """Our files read back (GGUF → HF checkpoint) hold each expert's weights as our reader
    decodes them (an expert's rows of the stacked tensor); transformers runs the import with
    the original logits (F32, F16: the checkpoint's own values) or up to the quantization
    error."""
    from quantbench.models.gguf_import import convert_gguf_to_hf
    from tests.models.moe_tiny import IDS

    mine = ours(tiny[kind], gguf_type, tmp_path / "ours")
    convert_gguf_to_hf(mine, tmp_path / "back", dtype=torch.float32, tokenizer=False)
    art = open_artifact(mine.parent)
    spec = arch_of(art.config)
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    decoded = dict(art.dequantized())
    assert sorted(back) == sorted(spec.output_name(n) for n in decoded)
    for name, w in decoded.items():
        assert torch.equal(back[spec.output_name(name)], w.float()), name
    with torch.inference_mode():
        ref, got = hf(tiny[kind])(IDS).logits, hf(tmp_path / "back")(IDS).logits
    bound = {"F32": 1e-6, "F16": 1e-6, "Q8_0": 0.05, "Q4_K_M": 0.3}[gguf_type]
    assert float((got - ref).norm() / ref.norm()) < bound


def test_non_renormalised_qwen3_moe_is_refused(tiny, tmp_path, capsys, monkeypatch):
    """llama.cpp's qwen3moe always renormalises the top-k routing weights: a config with
    norm_topk_prob false gets no GGUF (one line, before any work)."""
    import shutil

    from tests.faults.conftest import _qb, assert_no_leftovers, assert_refused

    src = tmp_path / "no-norm"
    shutil.copytree(tiny["qwen3_moe"], src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "norm_topk_prob": False}))
    monkeypatch.setenv("COLUMNS", "400")
    out = tmp_path / "outputs"
    assert_refused(_qb(capsys, "convert", src, "-o", out / "q", "--type", "Q8_0"),
                   "norm_topk_prob", "llama.cpp")
    assert_no_leftovers(out)


# ---------------------------------------------------------------------------- llama.cpp

@pytest.mark.slow  # llama-quantize runs
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q4_K_M"])
def test_quantizes_like_llama_quantize(kind, gguf_type, tiny, reference, llamacpp, tmp_path):
    """``llama-quantize`` of the converter's F16 file and our RTN file: the same type and
    bytes for every tensor (each expert quantized with the stacked tensor's one type)."""
    theirs = tmp_path / "theirs.gguf"
    llamacpp.run("llama-quantize", reference(kind), theirs, gguf_type, "2")
    assert_same_tensors(ours(tiny[kind], gguf_type, tmp_path / "ours"), theirs)


def _wide_moe(kind: str, directory: Path) -> Path:
    """256-wide rows (no k-quant fallback), 8 layers; Mixtral with 8 experts (the
    n_expert == 8 rules), Qwen3-MoE with 6."""
    from transformers import (MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    from tests.formats.test_gguf_meta import _qwen_tokenizer

    common = dict(vocab_size=320, hidden_size=256, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, num_experts_per_tok=2, bos_token_id=None,
                  eos_token_id=2)
    torch.manual_seed(0)
    if kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=256, num_local_experts=8,
                                                 **common))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=512,
                                                   moe_intermediate_size=256, num_experts=6,
                                                   head_dim=32, norm_topk_prob=True, **common))
    model.to(torch.float16).save_pretrained(str(directory))
    _qwen_tokenizer(directory)
    return directory


@pytest.mark.slow  # a converter run and 16 llama-quantize runs per kind
@pytest.mark.parametrize("kind", KINDS)
def test_mixtures_match_llama_quantize_on_wide_shapes(kind, converter, llamacpp,  # noqa: F811
                                                      tmp_path):
    """Every mixture's type for every tensor, as our plan gives it (``plan_tensor_types`` on
    the loaded model: what the writer uses) and as ``llama-quantize`` picks it."""
    from quantbench.formats.gguf_kv import gguf_tensor_name
    from quantbench.quant.gguf.plan import gguf_tensors, plan_tensor_types

    model_dir = _wide_moe(kind, tmp_path / kind)
    src = convert(converter, model_dir, tmp_path / "f16.gguf")
    model = load_model(model_dir)
    names = gguf_tensors(model)
    for ftype in (f for f in FILE_TYPES if f != "F32"):
        llamacpp.run("llama-quantize", src, tmp_path / "q.gguf", ftype, "2")
        theirs = {t.name: t.tensor_type.name for t in tensors(tmp_path / "q.gguf").values()}
        planned = plan_tensor_types(ftype, model, names)
        mine = {gguf_tensor_name(model.arch, n): t for n, t in planned.items()}
        assert mine == theirs, ftype


@pytest.mark.slow  # a calibrated run, llama-imatrix and llama-quantize
@pytest.mark.parametrize("kind", KINDS)
def test_imatrix_holds_experts_and_llama_quantize_reads_it(kind, tiny, reference, llamacpp,
                                                           tmp_path):
    """A calibrated imatrix run writes llama.cpp's imatrix layout for the stacked tensors
    (``in_sum2 ne = [cols, experts]``, ``counts ne = [1, experts]``, each expert's routed
    tokens); ``llama-quantize --imatrix`` on it makes our file's bytes, and so does our run
    from the file. ``llama-imatrix``'s own file (expert 0 of layer 0: no token) weighs our
    run as it weighs llama-quantize's."""
    from quantbench.calibration.imatrix_file import load_imatrix
    from tests.conftest import _wikitext_head

    q = quantize(load_model(tiny[kind]), method="imatrix", gguf_type="Q4_K_M",
                 calib_samples=4, calib_len=32, progress=False)
    out = save(q, tmp_path / "ours", format="gguf", progress=False)
    n = q.source.arch.num_experts
    imatrix = tensors(out / "imatrix.gguf")
    for proj in ("gate", "up", "down"):
        name = f"blk.1.ffn_{proj}_exps.weight"
        cols = q.source.weights.shape(f"model.layers.1.mlp.experts.0.{proj}_proj.weight")[1]
        assert [int(d) for d in imatrix[name + ".in_sum2"].shape] == [cols, n]
        assert [int(d) for d in imatrix[name + ".counts"].shape] == [1, n]
    counts = load_imatrix(out / "imatrix.gguf").entries["blk.1.ffn_gate_exps.weight"].counts
    assert counts.shape == (n,)
    assert int(counts.sum()) >= 2 * 4 * 32  # top-2 of every token (force-routed ones: all)
    theirs = tmp_path / "theirs.gguf"
    llamacpp.run("llama-quantize", "--imatrix", out / "imatrix.gguf", reference(kind), theirs,
                 "Q4_K_M", "2")
    assert_same_tensors(out / "model.gguf", theirs)
    again = ours(tiny[kind], "Q4_K_M", tmp_path / "again", method="imatrix",
                 imatrix_file=str(out / "imatrix.gguf"))
    assert_same_tensors(again, theirs)
    text, made = tmp_path / "text.txt", tmp_path / "llama-imatrix.gguf"
    text.write_text(_wikitext_head(chars=20000))
    llamacpp.run("llama-imatrix", "-m", reference(kind), "-f", text, "-o", made,
                 "-c", "64", "--chunks", "4", "-t", "2")
    assert int(load_imatrix(made).entries["blk.0.ffn_gate_exps.weight"].counts[0]) == 0
    llamacpp.run("llama-quantize", "--imatrix", made, reference(kind), theirs, "Q4_K_M", "2")
    assert_same_tensors(ours(tiny[kind], "Q4_K_M", tmp_path / "from-llama", method="imatrix",
                             imatrix_file=str(made)), theirs)


@pytest.mark.slow  # llama.cpp runs
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gguf_type", ["F16", "Q8_0", "Q4_K_M"])
def test_llama_cpp_runs_our_gguf_with_our_perplexity(kind, gguf_type, tiny, tmp_path,
                                                     llama_vs_ours):
    """llama.cpp loads our stacked experts and router and routes as our evaluator does: the
    same tokens, the same perplexity within 0.5 %. 32 windows: a token whose second and third
    expert score alike can be routed apart by float noise (llama.cpp's activation rounding
    against ours), which moves its loss a lot; over 4 windows that reached 0.5 %, over 32 it
    stays under 0.25 % (F16: 0.05 %)."""
    model = load_model(tiny[kind])
    out = save(quantize(model, method="rtn", gguf_type=gguf_type, progress=False),
               tmp_path / gguf_type, format="gguf", progress=False)
    mine, theirs, same_tokens = llama_vs_ours(out, model, ctx=64, chunks=32)
    assert same_tokens
    assert abs(mine / theirs - 1) < 0.005, (mine, theirs)
