"""Mixture-of-experts models (``models/experts.py``, ``models/families/moe.py``): Mixtral and
Qwen3-MoE through loading, router-calibrated quantization, every method and the safetensors
formats. GGUF of these families: tests/formats/test_gguf_moe.py.

Tiny random models from transformers' own config classes (tests/models/moe_tiny.py): top-k 2
of 6 (Mixtral) / 8 (Qwen3-MoE) experts, layer 0's router arranged so that expert 0 never gets a
token, so the force-routing fallback runs in every calibrated test.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantbench.api import quantize, save
from quantbench.errors import ConfigError, ModelLoadError
from quantbench.eval.run import artifact_factory, source_factory
from quantbench.formats.io import open_artifact
from quantbench.models.arch import arch_of
from quantbench.models.experts import RoutedExperts
from quantbench.models.loader import load_model
from tests.conftest import assert_gptqmodel_reloads, needs_gptqmodel
from tests.models.moe_tiny import IDS, make_tiny_moe

KINDS = ("mixtral", "qwen3_moe")
CALIB = {"calib_samples": 4, "calib_len": 32}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {kind: make_tiny_moe(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="module")
def models(tiny):
    return {kind: load_model(path) for kind, path in tiny.items()}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))


def reference(path: Path) -> torch.Tensor:
    """transformers' own forward of a checkpoint (``from_pretrained``, float32)."""
    return transformers_logits(path)


def ours(art, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.inference_mode():
        return artifact_factory(art)()(ids).float()


def transformers_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.inference_mode():
        return hf(IDS).logits.float()


# ------------------------------------------------------------------- layout and loading

@pytest.mark.parametrize("kind,count", [("mixtral", 6), ("qwen3_moe", 8)])
def test_spec_expands_to_every_expert(kind, count, models):
    arch = models[kind].arch
    assert arch.num_experts == count and arch.experts is not None
    experts = [lin for lin in arch.linears if lin.startswith("mlp.experts.")]
    assert len(experts) == 3 * count
    assert ("mlp.experts.3.gate_proj", "mlp.experts.3.up_proj") in arch.sequential_groups
    assert "mlp.gate" in arch.kept and "mlp.gate" not in arch.linears
    mlp = arch.sublayers[-1]
    assert mlp.mixer == "mlp" and mlp.output is None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fused", [False, True], ids=["per-expert", "fused-3d"])
def test_every_layout_loads_with_transformers_logits(kind, fused, tmp_path):
    """Per-expert checkpoints (Mixtral's ``block_sparse_moe.experts.N.w1/w3/w2``, Qwen's
    ``mlp.experts.N.gate/up/down_proj``) and transformers 5's fused 3-D parameters load into
    our routed-experts module with transformers' own logits."""
    path = make_tiny_moe(kind, tmp_path / kind, fused=fused)
    stored = load_file(str(path / "model.safetensors"))
    if fused:
        assert "model.layers.0.mlp.experts.gate_up_proj" in stored
    elif kind == "mixtral":
        assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in stored
    model = load_model(path)
    assert "model.layers.1.mlp.experts.2.down_proj.weight" in model.weights
    assert model.weights.shape("model.layers.0.mlp.experts.1.up_proj.weight") == \
        (96 if kind == "mixtral" else 64, 64)
    with torch.inference_mode():
        net = source_factory(model)()
        got = net(IDS).float()
    assert isinstance(net.model.model.layers[0].mlp.experts, RoutedExperts)
    torch.testing.assert_close(got, reference(path), rtol=0, atol=2e-5)


def test_fused_views_read_the_right_rows(tmp_path):
    """Each per-expert view of a fused parameter is that expert's gate rows, up rows, down."""
    path = make_tiny_moe("qwen3_moe", tmp_path / "q", fused=True)
    stored = load_file(str(path / "model.safetensors"))
    model = load_model(path)
    gate_up = stored["model.layers.1.mlp.experts.gate_up_proj"]
    inter = gate_up.shape[1] // 2
    for e in (0, 5, 7):
        w = model.weights.get
        assert torch.equal(w(f"model.layers.1.mlp.experts.{e}.gate_proj.weight"), gate_up[e, :inter])
        assert torch.equal(w(f"model.layers.1.mlp.experts.{e}.up_proj.weight"), gate_up[e, inter:])
        assert torch.equal(w(f"model.layers.1.mlp.experts.{e}.down_proj.weight"),
                           stored["model.layers.1.mlp.experts.down_proj"][e])


# ------------------------------------------------------------- calibration by the router

def test_coverage_is_recorded_and_starved_experts_fall_back(models, tmp_path):
    """Every expert's tokens are counted per layer; expert 0 of layer 0 gets none and is
    force-routed (statistics from all of the layer's tokens): it is still quantized with a
    Hessian, so GPTQ moves it off plain rounding, and the manifest says so."""
    model = models["qwen3_moe"]
    q = quantize(model, method="gptq", bits=4, group_size=16, progress=False, **CALIB)
    out = save(q, tmp_path / "gptq", format="dense", progress=False)
    coverage = json.loads((out / "quantbench.json").read_text())["experts"]
    assert coverage["experts"] == 8 and coverage["min_tokens_threshold"] == 16
    layer0 = coverage["layers"][0]
    assert layer0["min_tokens"] == 0 and 0 in layer0["force_routed"]
    assert layer0["below_threshold"] == layer0["force_routed"]
    total = CALIB["calib_samples"] * CALIB["calib_len"] * 2  # top-2: two slots per token
    assert sum(q.expert_tokens[0]) == total and sum(q.expert_tokens[1]) == total
    art = open_artifact(out)
    rtn = quantize(model, method="absmax", bits=4, group_size=16, progress=False)
    rtn_w = dict(rtn.run().iter_blocks())
    for e in (0, 3):
        name = f"model.layers.0.mlp.experts.{e}.down_proj.weight"
        gptq_w = art.quantized(name) if name in art.quantized_names else None
        back = dict(art.dequantized())[name].float()
        assert torch.isfinite(back).all()
        source = model.weights.get(name).float()
        assert (back - source).norm() < 0.25 * source.norm()
        assert not torch.equal(back, rtn_w["block 0"][name].dequantize().float()), e
        del gptq_w


def test_awq_coverage_says_no_statistic_was_needed(models, tmp_path):
    """AWQ then rounding takes no per-expert statistic: the coverage still counts every
    expert's tokens (from the router) and names the starved ones, without claiming a
    force-routing that did not happen."""
    q = quantize(models["mixtral"], method="awq", bits=4, group_size=32, progress=False,
                 **CALIB)
    coverage = q.run().expert_coverage()
    layer0 = coverage["layers"][0]
    assert 0 in layer0["below_threshold"] and layer0["force_routed"] == []
    assert coverage["fallback"].startswith("no fallback")
    assert sum(q.expert_tokens[0]) == CALIB["calib_samples"] * CALIB["calib_len"] * 2


def test_threshold_and_router_weighting_options(models, tmp_path):
    """``expert_min_tokens`` moves experts to the fallback; ``router_weighted`` (opt-in)
    changes the Hessians (so the codes) of routed experts only, never of a force-routed
    one."""
    model = models["mixtral"]
    runs = {}
    for label, opts in {"default": {}, "all": {"expert_min_tokens": 10 ** 6},
                        "weighted": {"router_weighted": True}}.items():
        q = quantize(model, method="gptq", bits=4, group_size=16, progress=False, **CALIB,
                     **opts)
        runs[label] = {n: t for _, block in q.run().iter_blocks() for n, t in block.items()}
        coverage = q.expert_coverage()
        if label == "all":
            assert all(layer["force_routed"] == list(range(6)) for layer in coverage["layers"])
        assert coverage["router_weighted"] is (label == "weighted")
    starved = "model.layers.0.mlp.experts.0.gate_proj.weight"
    routed = "model.layers.0.mlp.experts.2.gate_proj.weight"
    codes = {k: {n: r[n].codes for n in (starved, routed)} for k, r in runs.items()}
    assert torch.equal(codes["default"][starved], codes["weighted"][starved])
    assert not torch.equal(codes["default"][routed], codes["weighted"][routed])
    assert not torch.equal(codes["default"][routed], codes["all"][routed])


# ---------------------------------------------------------------------- every method

METHODS = {  # name: (quantize options, format written)
    "absmax": ({"method": "absmax", "bits": 4, "group_size": 32}, "compressed-tensors"),
    "zeropoint": ({"method": "zeropoint", "bits": 4, "group_size": 32}, "dense"),
    "gptq-act-order": ({"method": "gptq", "bits": 4, "group_size": 32, "act_order": True,
                        **CALIB}, "gptq"),
    "awq": ({"method": "awq", "bits": 4, "group_size": 32, **CALIB}, "awq"),
    "nf4": ({"method": "nf4"}, "dense"),
    "llm_int8": ({"method": "llm_int8", "calib_samples": 2, "calib_len": 64}, "dense"),
    "exl2": ({"method": "exl2", "bpw": 4.6, "batch_size": 2, "measure_samples": 4, **CALIB},
             "exl2"),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_quantizes_every_expert(kind, name, models, tiny, tmp_path):
    """Each method quantizes every expert's three linears and the attention of both blocks,
    keeps the router as stored, and the artifact read back stays close to the source."""
    model = models[kind]
    options, fmt = METHODS[name]
    q = quantize(model, progress=False, **options)
    art = open_artifact(save(q, tmp_path / name, format=fmt, progress=False))
    linears = {f"model.layers.{i}.{lin}.weight" for i in range(2) for lin in model.arch.linears}
    assert linears <= set(q.targets)
    assert set(art.quantized_names) == (set() if fmt == "dense" else set(q.targets))
    back = dict(art.dequantized())
    for i in range(2):
        key = f"model.layers.{i}.mlp.gate.weight"
        if name != "awq":  # AWQ folds the norm's scales into the router (exactly)
            assert torch.equal(back[key].float(), model.weights.get(key).float()), key
    ref = reference(tiny[kind])
    assert float((ours(art) - ref).norm() / ref.norm()) < 0.5


def test_awq_folds_into_the_router_exactly(tiny):
    """The MoE folding pairs (norm → router + every expert's gate/up, each up → its down)
    leave the block's output unchanged."""
    from transformers import AutoModelForCausalLM

    from quantbench.models.experts import install_routed_experts
    from quantbench.quant.awq import fold_scales

    path = tiny["qwen3_moe"]
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64).eval()
    arch = arch_of(json.loads((path / "config.json").read_text()))
    state = {k: v for k, v in hf.state_dict().items()}
    install_routed_experts(hf, arch).double()
    model = load_model(path)
    hf.load_state_dict({**{k: v for k, v in state.items() if ".experts." not in k},
                        **{n: model.weights.get(n).double() for n in model.weights.names()
                           if ".experts." in n}}, strict=True)
    with torch.inference_mode():
        before = hf(IDS).logits
    layer = hf.model.layers[1]
    g = torch.Generator().manual_seed(3)
    pairs = [p for p in arch.scale_folding if p[1][0].startswith("mlp.")]
    assert pairs[0][1][0] == "mlp.gate" and len(pairs) == 1 + 8
    for prev, linears in pairs:
        mods = [layer.get_submodule(m) for m in linears]
        scales = torch.rand(mods[0].weight.shape[1], generator=g, dtype=torch.float64) + 0.5
        fold_scales(layer.get_submodule(prev), mods, scales)
    with torch.inference_mode():
        torch.testing.assert_close(hf(IDS).logits, before, rtol=1e-9, atol=1e-9)


# -------------------------------------------------------- formats reloaded by their runtime

@pytest.mark.parametrize("kind", KINDS)
def test_dense_reloads_in_transformers_under_the_stored_names(kind, models, tmp_path):
    """The dense output stores Mixtral's experts as ``block_sparse_moe.experts.N.w1/w3/w2``
    (what transformers 5 converts on load, vLLM and GPTQModel read) and Qwen3-MoE's as
    ``mlp.experts.N.*``; transformers reloads either with our logits."""
    q = quantize(models[kind], method="zeropoint", bits=4, group_size=32, progress=False)
    out = save(q, tmp_path / "dense", format="dense", progress=False)
    names = set(load_file(str(out / "model.safetensors")))
    if kind == "mixtral":
        assert "model.layers.0.block_sparse_moe.experts.5.w2.weight" in names
        assert "model.layers.0.block_sparse_moe.gate.weight" in names
        assert not any(".mlp." in n for n in names)
    else:
        assert "model.layers.0.mlp.experts.7.down_proj.weight" in names
    torch.testing.assert_close(transformers_logits(out), ours(open_artifact(out)),
                               rtol=0, atol=2e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_compressed_tensors_reloads_in_transformers(kind, models, tmp_path):
    """transformers + compressed-tensors decompress our MoE file (Mixtral under vLLM's
    ``block_sparse_moe`` names, converted by transformers on load) to our logits up to the
    float16 rounding of its weights."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    q = quantize(models[kind], method="absmax", bits=4, group_size=32, progress=False)
    out = save(q, tmp_path / "ct", format="compressed-tensors", progress=False)
    mine = ours(open_artifact(out))
    hf = AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float16, quantization_config=CompressedTensorsConfig(dequantize=True))
    with torch.inference_mode():
        theirs = hf.float()(IDS).logits
    assert (theirs - mine).abs().max() < 1e-3 * mine.abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_gptq_and_compressed_tensors_name_experts_as_stored(kind, models, tmp_path):
    q = quantize(models[kind], method="gptq", bits=4, group_size=32, progress=False, **CALIB)
    for fmt, suffix in (("gptq", "qweight"), ("compressed-tensors", "weight_packed")):
        out = save(q, tmp_path / fmt, format=fmt, progress=False)
        names = set(load_file(str(out / "model.safetensors")))
        # vLLM reads Mixtral's experts as block_sparse_moe.experts.N.w1/w3/w2; GPTQModel
        # (transformers 5) as mlp.experts.N.gate/up/down_proj
        legacy = kind == "mixtral" and fmt == "compressed-tensors"
        expert = ("model.layers.1.block_sparse_moe.experts.3.w3" if legacy
                  else "model.layers.1.mlp.experts.3.up_proj")
        assert f"{expert}.{suffix}" in names
        router = ("model.layers.1.block_sparse_moe.gate" if legacy
                  else "model.layers.1.mlp.gate")
        assert f"{router}.weight" in names and f"{router}.{suffix}" not in names
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        if fmt == "compressed-tensors":
            targets = config["config_groups"]["group_0"]["targets"]
            assert any(expert.replace(".", r"\.") in t for t in targets)
            assert not any("gate$" in t and "experts" not in t for t in targets)
        art = open_artifact(out)
        assert set(art.quantized_names) == set(q.targets)


@pytest.mark.slow
@needs_gptqmodel
@pytest.mark.parametrize("kind", KINDS)
def test_gptq_reloads_in_gptqmodel(kind, models, tmp_path):
    """GPTQModel (peer venv; its own loader: transformers' GPTQ integration cannot quantize
    fused 3-D experts) loads our gptq MoE files, every expert quantized, with our logits up
    to its float16 arithmetic. GPTQModel names Mixtral's experts ``mlp.experts.N.*_proj``
    under transformers 5, so the gptq format writes those names."""
    out = save(quantize(models[kind], method="gptq", bits=4, group_size=32, symmetric=False,
                        progress=False, **CALIB), tmp_path / "gptq", format="gptq",
               progress=False)
    names = set(load_file(str(out / "model.safetensors")))
    assert "model.layers.0.mlp.experts.5.gate_proj.qweight" in names  # GPTQModel's names
    assert_gptqmodel_reloads(out, IDS, ours(open_artifact(out)), tmp_path,
                             script="gptqmodel_logits.py")


def test_bitsandbytes_refuses_experts_and_takes_attention(models, tmp_path):
    from quantbench.config import TargetConfig

    model = models["mixtral"]
    q = quantize(model, method="nf4", progress=False)
    with pytest.raises(ConfigError, match="fused 3-D parameters.*--exclude 'mlp.experts'"):
        save(q, tmp_path / "bnb", format="bitsandbytes", progress=False)
    assert not (tmp_path / "bnb").exists()
    q = quantize(model, method="nf4", targets=TargetConfig(exclude=("mlp.experts",)),
                 progress=False)
    art = open_artifact(save(q, tmp_path / "bnb2", format="bitsandbytes", progress=False))
    assert art.quantized_names and all("self_attn" in n for n in art.quantized_names)


# ------------------------------------------------------------------------- bad input

def _edit_fused(path: Path, edit) -> Path:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("case,edit,needle", [
    ("odd-gate-up", lambda t: t.__setitem__(
        "model.layers.0.mlp.experts.gate_up_proj",
        t["model.layers.0.mlp.experts.gate_up_proj"][:, :-1].contiguous()),
     "even row count"),
    ("two-d", lambda t: t.__setitem__("model.layers.1.mlp.experts.down_proj",
                                      t["model.layers.1.mlp.experts.down_proj"][0]),
     "is \\[experts, rows, columns\\]"),
    ("fewer-experts", lambda t: t.__setitem__("model.layers.1.mlp.experts.down_proj",
                                              t["model.layers.1.mlp.experts.down_proj"][:7]),
     "model.layers.1.mlp.experts.7.down_proj.weight is missing"),
    ("router-rows", lambda t: t.__setitem__("model.layers.0.mlp.gate.weight",
                                            t["model.layers.0.mlp.gate.weight"][:5]),
     "model.layers.0.mlp.gate.weight has shape \\[5, 64\\]"),
])
def test_damaged_fused_experts_are_refused(case, edit, needle, tmp_path):
    path = _edit_fused(make_tiny_moe("qwen3_moe", tmp_path / case, fused=True), edit)
    with pytest.raises(ModelLoadError, match=needle):
        load_model(path)


@pytest.mark.parametrize("key,value,needle", [
    ("num_experts_per_tok", 9, "routes each token to more experts"),
    ("num_local_experts", 0, "must be a positive integer"),
    ("num_local_experts", 4, "is not part of a mixtral model|experts.4"),
])
def test_config_that_contradicts_the_experts_is_refused(key, value, needle, tiny, tmp_path):
    path = Path(shutil.copytree(tiny["mixtral"], tmp_path / "m"))
    config = json.loads((path / "config.json").read_text())
    config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=needle):
        load_model(path)


def test_a_missing_expert_is_named(tiny, tmp_path):
    path = Path(shutil.copytree(tiny["mixtral"], tmp_path / "m"))
    _edit_fused(path, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(ModelLoadError, match="block_sparse_moe.experts.2.w3.weight is missing"):
        load_model(path)


def test_partly_dense_qwen_moe_is_refused(tiny, tmp_path):
    path = Path(shutil.copytree(tiny["qwen3_moe"], tmp_path / "q"))
    config = json.loads((path / "config.json").read_text())
    config["mlp_only_layers"] = [1]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="some layers dense"):
        load_model(path)
