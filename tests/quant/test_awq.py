import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantbench.api import evaluate, quantize, save
from quantbench.config import IntGridConfig
from quantbench.errors import ConfigError
from quantbench.formats.io import open_artifact
from quantbench.models.loader import load_model
from quantbench.quant import awq as awq_maths
from quantbench.quant.awq import (apply_clip, candidate_scales, expected_candidates, fake_quant,
                                  fake_quant_groups, fold_scales, scaled_trial, search_clip,
                                  search_scales)
from quantbench.quant.grid import pad_groups
from quantbench.quant.methods.awq import SEARCH_FILE
from quantbench.quant.run import make_config

GRID = IntGridConfig.from_group_size(3, 16, symmetric=False)


def outlier_inputs(n=512, d=64, seed=0):
    """Activations with a few large channels, as in real LLMs (AWQ's premise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, :4] *= 20
    return x


def test_scale_search_beats_plain_rounding_on_outlier_channels():
    x = outlier_inputs()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    ref = x @ w.t()
    found = search_scales(x.abs().mean(0), [w], GRID, lambda ws: x @ ws[0].t(), ref, n_grid=20)
    assert found.ratio is not None and min(found.losses.values()) == found.losses[found.ratio]
    assert len(found.losses) < 15  # coarse + refine, not all 21 points
    full = search_scales(x.abs().mean(0), [w], GRID, lambda ws: x @ ws[0].t(), ref, n_grid=20,
                         exhaustive=True)
    assert len(full.losses) == 21 and full.ratio == found.ratio  # unimodal here
    # what `convert --plan` counts per search (its estimate was 2.5x high counting all 21)
    assert abs(len(found.losses) - expected_candidates(20)) <= 2
    assert expected_candidates(20, exhaustive=True) == len(full.losses)
    err_rtn = (x @ fake_quant(w, GRID).t() - ref).pow(2).mean()
    s = found.scales
    err_awq = (x @ (fake_quant(w * s, GRID) / s).t() - ref).pow(2).mean()
    assert err_awq < 0.7 * err_rtn


def test_candidate_scales_are_normalised():
    s = candidate_scales(torch.rand(32) + 0.1, torch.rand(32) + 0.1, 0.5)
    assert torch.isclose(s.max() * s.min(), torch.tensor(1.0))
    assert torch.allclose(candidate_scales(torch.rand(8) + 0.1, None, 0.0), torch.ones(8))


def test_clip_search_never_increases_group_error():
    x = outlier_inputs(seed=2)
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(3))
    w[0, 5] = 8.0  # one outlier weight stretches its group's range
    max_val = search_clip(w, x, GRID, n_grid=20, max_shrink=0.5, row_batch=16)
    assert max_val.shape == (40, 4)
    clipped = apply_clip(w, max_val, GRID)
    err = lambda q: (x @ q.t() - x @ w.t()).pow(2).mean()  # noqa: E731
    assert err(fake_quant(clipped, GRID)) <= err(fake_quant(w, GRID)) * 1.0001
    assert max_val[0, 0] < 8.0  # the outlier's group was clipped


def test_clip_search_handles_a_short_last_group():
    grid = IntGridConfig.from_group_size(4, 24, symmetric=False)
    x, w = outlier_inputs(d=64)[:128], torch.randn(8, 64)
    assert search_clip(w, x, grid).shape == (8, 3)


GRIDS = [IntGridConfig.from_group_size(4, 16, symmetric=False),
         IntGridConfig.from_group_size(4, 16, symmetric=True),
         IntGridConfig.from_group_size(3, 24, symmetric=False),   # short last group (64 = 2·24 + 16)
         IntGridConfig.from_group_size(2, 24, symmetric=True),
         IntGridConfig.from_group_size(4, -1, symmetric=False)]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"b{g.bits}g{g.group_size}s{g.symmetric}")
def test_grouped_fake_quant_is_value_for_value_the_general_one(grid):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(24, 64, generator=g) * 0.05
    w[2] = 0.0          # an all-zero row: the smallest positive scale
    w[3, :20] = 0.3     # a constant group
    rows = pad_groups(w, grid)
    q = fake_quant_groups(rows, grid).reshape(24, -1)[:, :64]
    assert torch.equal(q, fake_quant(w, grid))
    s = torch.rand(64, generator=g) + 0.5
    assert torch.equal(scaled_trial(w, s, grid), fake_quant(w * s, grid) / s)


def _clip_reference(w, x, grid, n_grid=20, max_shrink=0.5):
    """The sequential clip search: one candidate at a time, errors from the outputs. Returns
    the choice and a function giving the output error of any clip values."""
    wg = pad_groups(w, grid)
    xg = pad_groups(x, grid).transpose(0, 1)
    ref = torch.bmm(xg, wg.permute(1, 2, 0))
    org_max = wg.abs().amax(dim=2)

    def error(max_val):
        bound = max_val.unsqueeze(-1)
        trial = torch.maximum(torch.minimum(wg, bound), -bound).reshape(w.shape[0], -1)
        q = pad_groups(fake_quant(trial, grid), grid)
        return (torch.bmm(xg, q.permute(1, 2, 0)) - ref).pow_(2).mean(dim=1).t()

    best_err, best = torch.full_like(org_max, float("inf")), org_max.clone()
    for i in range(max(1, int(max_shrink * n_grid))):
        max_val = org_max * (1 - i / n_grid)
        err = error(max_val)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, max_val, best)
    return best, best_err, error


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"b{g.bits}g{g.group_size}s{g.symmetric}")
def test_clip_search_picks_what_the_sequential_one_picks(grid, monkeypatch):
    """The Gram-matrix error is the output error up to float rounding: the same choice but
    for near-ties, where the choice is as good as the sequential search's to 1e-5."""
    x = outlier_inputs(n=256, seed=4)
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(5))
    w[0, 5] = 8.0
    expected, best_err, error = _clip_reference(w, x, grid)

    def check(found):
        assert (found == expected).float().mean() >= 0.98
        assert torch.all(error(found) <= best_err * (1 + 1e-5) + 1e-12)

    for row_batch in (512, 16):   # CPU: one candidate at a time
        check(search_clip(w, x, grid, row_batch=row_batch))
    # a GPU evaluates candidates in batches (here 3, 3, 3, 1)
    monkeypatch.setattr(awq_maths, "_clip_chunk", lambda elems, n, device: 3)
    check(search_clip(w, x, grid, row_batch=16))


def test_search_with_an_error_function_matches_inspect_and_reference():
    x = outlier_inputs(seed=6)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(7)) * 0.05
    ref = x @ w.t()
    by_output = search_scales(x.abs().mean(0), [w], GRID, lambda ws: x @ ws[0].t(), ref)
    error = awq_maths.output_error(lambda ws: x @ ws[0].t(), ref)
    by_error = search_scales(x.abs().mean(0), [w], GRID, error=error)
    assert by_error.ratio == by_output.ratio and by_error.losses == by_output.losses
    with pytest.raises(TypeError):
        search_scales(x.abs().mean(0), [w], GRID)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_searches_on_a_gpu_match_the_cpu():
    cuda = torch.device("cuda")
    x = outlier_inputs(seed=8)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(9)) * 0.05
    cpu = search_scales(x.abs().mean(0), [w], GRID, lambda ws: x @ ws[0].t(), x @ w.t())
    xc, wc = x.to(cuda), w.to(cuda)
    gpu = search_scales(xc.abs().mean(0), [wc], GRID, lambda ws: xc @ ws[0].t(), xc @ wc.t())
    assert gpu.ratio == cpu.ratio and gpu.scales.device.type == "cuda"
    assert torch.allclose(gpu.scales.cpu(), cpu.scales)
    clip = search_clip(wc, xc, GRID)
    assert clip.device.type == "cuda"
    assert (clip.cpu() == search_clip(w, x, GRID)).float().mean() > 0.98  # ties may differ


class _FactoryWatch(torch.overrides.TorchFunctionMode):
    """Records tensor factories that quantbench code calls without ``device=`` (they would
    allocate on the CPU while the block lives on a GPU)."""

    FACTORIES = frozenset({torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
                           torch.tensor, torch.linspace, torch.eye, torch.rand, torch.randn})

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and kwargs.get("device") is None:
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is not None and "/quantbench/" in frame.f_code.co_filename:
                self.calls.append(f"{func.__name__} at {frame.f_code.co_filename}:{frame.f_lineno}")
        return func(*args, **kwargs)


def test_awq_allocates_nothing_without_a_device(tiny_llama):
    """Everything AWQ creates takes its device from an input tensor, so the same code runs on a
    GPU's blocks (checked here on the CPU by watching the factory calls)."""
    from quantbench.calibration.pipeline import (BlockContext, _skeleton, capture_inputs,
                                                 materialize_block)
    from quantbench.quant.methods.awq import awq_block

    model = load_model(tiny_llama)
    config = make_config("awq", 4, 16, False, calib_samples=4, calib_len=32, search_samples=2)
    windows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(2))
    skeleton = _skeleton(model)
    captured = capture_inputs(model, skeleton, windows, batch_size=1)
    layer = materialize_block(skeleton, model, 0)
    targets = {n for n in model.weights.names() if n.endswith("proj.weight")}
    ctx = BlockContext(model, layer, 0, captured.hidden, captured.kwargs, targets)
    with _FactoryWatch() as watch:
        result = awq_block(ctx, config)
    assert result and watch.calls == []


def test_folding_leaves_the_float_model_unchanged(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model(ids).logits
    g = torch.Generator().manual_seed(5)
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        fold_scales(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj],
                    torch.rand(64, generator=g) + 0.5)
        fold_scales(layer.post_attention_layernorm, [m.gate_proj, m.up_proj],
                    torch.rand(64, generator=g) + 0.5)
        fold_scales(m.up_proj, [m.down_proj], torch.rand(128, generator=g) + 0.5)
    with torch.inference_mode():
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-4)


def test_awq_block_without_clipping_keeps_the_float_function(tiny_llama):
    """The whole AWQ pass (search + fold) before rounding: the written float model with
    clipping off computes what the source computes."""
    from quantbench.calibration.pipeline import (BlockContext, _skeleton, capture_inputs,
                                                 materialize_block)
    from quantbench.quant.methods.awq import awq_block

    model = load_model(tiny_llama)
    config = make_config("awq", 3, 16, False, clip=False, calib_samples=4, calib_len=32)
    windows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    skeleton = _skeleton(model)
    captured = capture_inputs(model, skeleton, windows, batch_size=2)
    layer = materialize_block(skeleton, model, 0)
    with torch.inference_mode():
        ref = [layer(h, **kw)[0] if isinstance(layer(h, **kw), tuple) else layer(h, **kw)
               for h, kw in zip(captured.hidden, captured.kwargs)]
    targets = {n for n in model.weights.names() if n.endswith("proj.weight")}
    result = awq_block(BlockContext(model, layer, 0, captured.hidden, captured.kwargs, targets),
                       config)
    assert "model.layers.0.input_layernorm.awq_scales" in result
    assert "model.layers.0.post_attention_layernorm.awq_scales" in result
    assert "model.layers.0.mlp.up_proj.awq_scales" in result
    # GQA: v_proj (32 outputs) cannot feed o_proj (64 inputs) a scale
    assert "model.layers.0.self_attn.v_proj.awq_scales" not in result
    with torch.inference_mode():
        for h, kw, r in zip(captured.hidden, captured.kwargs, ref):
            out = layer(h, **kw)
            out = out[0] if isinstance(out, tuple) else out
            assert torch.allclose(out, r, atol=1e-4)


@pytest.mark.parametrize("then", ["rtn", "gptq"])
def test_awq_end_to_end_and_saved_search_reapplies(tiny_llama, tmp_path, then):
    model = load_model(tiny_llama)
    q = quantize(model, method="awq", bits=4, group_size=32, symmetric=False, then=then,
                 calib_samples=4, calib_len=32, n_grid=5)
    out = save(q, tmp_path / "awq", format="dense")
    search = out / SEARCH_FILE
    assert search.is_file()
    art = open_artifact(out)
    assert not any("awq" in n for n in art.plain_names)  # the search file is not weights
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(art.weights.get(norm), model.weights.get(norm))  # scales folded
    if then == "rtn":  # data-free re-application gives the same file contents
        again = quantize(model, method="awq", bits=4, group_size=32, symmetric=False,
                         search_file=str(search))
        assert not again.method.needs_calibration
        out2 = save(again, tmp_path / "awq2", format="dense")
        art2 = open_artifact(out2)
        for name in art.weights.names():
            a, b = art.weights.get(name), art2.weights.get(name)
            assert (a.float() - b.float()).abs().max() <= 1e-3 * a.float().abs().max(), name


def test_awq_refusals():
    from quantbench.registry import get_method

    awq = get_method("awq")
    with pytest.raises(ConfigError, match="per-group or per-channel"):
        awq(make_config("awq", 4, 0, False))
    with pytest.raises(ConfigError, match="--then"):
        awq(make_config("awq", 4, 32, False, then="hqq"))
    with pytest.raises(ConfigError, match="AWQ search file"):
        awq(make_config("awq", 4, 32, False, search_file="/nonexistent.safetensors"))


# ------------------------------------------------------------------------- AWQ onto GGUF types

@pytest.fixture(scope="module")
def tiny_wide(tmp_path_factory):
    """Rows a multiple of 256 (k-quant super-blocks), 2 blocks."""
    from tests.conftest import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("wide") / "llama", hidden=256,
                           intermediate=512)


def test_proxy_grids_follow_the_ggml_block_types():
    from quantbench.quant.methods.awq import proxy_grid

    q4k, q5_0, q3k = proxy_grid("Q4_K"), proxy_grid("Q5_0"), proxy_grid("Q3_K")
    assert (q4k.bits, q4k.group_size, q4k.symmetric) == (4, 32, False)
    assert (q5_0.bits, q5_0.group_size, q5_0.symmetric) == (5, 32, True)
    assert (q3k.bits, q3k.group_size, q3k.symmetric) == (3, 16, True)
    assert proxy_grid("F16") is None and proxy_grid("F32") is None


def _effective(art, layer: int, linear: str, norm: str) -> torch.Tensor:
    """``W · diag(norm)``: what a folded pair computes (scales folded into the norm cancel)."""
    p = f"model.layers.{layer}."
    return art.weights.get(f"{p}{linear}.weight").float() * \
        art.weights.get(f"{p}{norm}.weight").float().view(1, -1)


@pytest.mark.parametrize("then", ["rtn", "gptq"])
def test_awq_onto_gguf_folds_scales_into_the_file(tiny_wide, tmp_path, then):
    """AWQ on --type Q4_K_M: scales searched on the proxy grids fold into the F32 norms and the
    linears before each tensor takes its ggml type; the folded model computes what the source
    does up to quantization error; the search is written beside model.gguf and re-applies."""
    model = load_model(tiny_wide)
    q = quantize(model, method="awq", gguf_type="Q4_K_M", then=then, calib_samples=4,
                 calib_len=64, n_grid=5)
    out = save(q, tmp_path / "g", format="gguf")
    assert (out / SEARCH_FILE).is_file() and (out / "model.gguf").is_file()
    art = open_artifact(out)
    assert art.format == "gguf"
    src = open_artifact(tiny_wide)
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.allclose(art.weights.get(norm).float(), src.weights.get(norm).float())
    for layer in (0, 1):  # a pair whose norm were left unscaled would be off by the scales
        for linear, ln in (("self_attn.q_proj", "input_layernorm"),
                           ("mlp.gate_proj", "post_attention_layernorm")):
            want = _effective(src, layer, linear, ln)
            rel = (_effective(art, layer, linear, ln) - want).norm() / want.norm()
            assert rel < 0.12, (layer, linear, float(rel))  # Q4_K/Q5_0 error + clipping
    rtn = save(quantize(model, method="rtn", gguf_type="Q4_K_M"), tmp_path / "rtn",
               format="gguf")
    kld = {p.name: evaluate(p, ctx=64, max_tokens=1024, use_cache=False).results[p.name]
           .kld_mean for p in (out, rtn)}
    assert kld["g"] < 1.5 * kld["rtn"], kld  # the same function, quantized
    if then == "rtn":  # the saved search, data-free, gives the same file
        again = quantize(model, method="awq", gguf_type="Q4_K_M",
                         search_file=str(out / SEARCH_FILE))
        assert not again.method.needs_calibration
        out2 = save(again, tmp_path / "g2", format="gguf")
        assert (out2 / "model.gguf").read_bytes() == (out / "model.gguf").read_bytes()


def test_awq_refuses_a_float_gguf_type():
    from quantbench.registry import get_method

    with pytest.raises(ConfigError, match="quantized GGUF type"):
        get_method("awq")(make_config("awq", gguf_type="F16"))
