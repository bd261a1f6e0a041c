"""``--device``: resolution and refusals everywhere; the CUDA paths themselves where torch sees
a GPU (skipped otherwise, with the reason) — GPTQ, AWQ and the evaluator on the GPU agree with
the CPU."""
import pytest
import torch

from quantbench.devices import resolve_device, to_device
from quantbench.errors import ConfigError
from tests.test_cli import assert_one_line_error, run

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="torch sees no CUDA GPU on this machine")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if CUDA else "cpu")
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("gpu0")
    with pytest.raises(ConfigError, match="not supported"):
        resolve_device("meta")
    if not CUDA:
        with pytest.raises(ConfigError, match="use --device cpu"):
            resolve_device("cuda")
    else:
        with pytest.raises(ConfigError, match="only"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_to_device_moves_nested_kwargs():
    kw = {"position_embeddings": (torch.ones(2), torch.zeros(2)), "mask": None, "ids": [torch.ones(1)]}
    moved = to_device(kw, torch.device("cpu"))
    assert moved["mask"] is None and isinstance(moved["position_embeddings"], tuple)
    assert torch.equal(moved["ids"][0], kw["ids"][0])


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without a GPU")
def test_cuda_refused_without_gpu_and_nothing_written(tiny_llama, tmp_path):
    out = tmp_path / "q"
    proc = run("convert", tiny_llama, "--method", "gptq", "--group-size", "32",
               "--calib-samples", "2", "--calib-len", "32", "--device", "cuda", "-o", out)
    assert_one_line_error(proc, "no CUDA GPU", "--device cpu")
    assert not out.exists()
    proc = run("eval", tiny_llama, "--device", "cuda:1", "--max-tokens", "256")
    assert_one_line_error(proc, "--device cpu")


def test_data_free_method_refuses_device(tiny_llama, tmp_path):
    proc = run("convert", tiny_llama, "--method", "rtn", "--device", "cpu", "-o", tmp_path / "q")
    assert_one_line_error(proc, "takes no --device")


def test_gptq_on_cpu_records_device(tiny_llama, tmp_path):
    import json

    out = tmp_path / "q"
    proc = run("convert", tiny_llama, "--method", "gptq", "--group-size", "32",
               "--calib-samples", "2", "--calib-len", "32", "--device", "cpu", "-o", out)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "quantbench.json").read_text())
    assert manifest["summary"]["quantize_device"] == "cpu"
    assert manifest["quantize"]["options"]["device"] == "cpu"


def only(report):
    (result,) = report.results.values()
    return result


# ---- on a GPU -------------------------------------------------------------------------------

def _correlated(out_f=96, in_f=256, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) / in_f ** 0.5 + torch.eye(in_f)
    x = torch.randn(n, in_f, generator=g) @ mix
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    return w, 2 * x.T @ x / n


@needs_cuda
@pytest.mark.parametrize("act_order,static", [(True, True), (True, False), (False, False)])
def test_gptq_on_cuda_matches_cpu(act_order, static):
    from quantbench.config import IntGridConfig
    from quantbench.quant.gptq import GPTQParams, gptq_quantize

    w, h = _correlated()
    grid = IntGridConfig.from_group_size(4, 64, False)
    params = GPTQParams(0.01, 128, act_order, static)
    cpu, s_cpu = gptq_quantize(w, h, grid, params)
    gpu, s_gpu = gptq_quantize(w.cuda(), h.cuda(), grid, params)
    assert gpu.codes.is_cuda
    gpu = gpu.to("cpu")
    # float32 on both; the Cholesky and matmuls round differently, so a few codes at ties move
    assert (gpu.codes != cpu.codes).float().mean() < 0.01
    assert abs(s_gpu.proxy_error / s_cpu.proxy_error - 1) < 0.02
    if cpu.g_idx is not None:
        assert torch.equal(gpu.g_idx, cpu.g_idx)


def _convert(src, out, method, device, extra=()):
    group = () if method == "llm_int8" else ("--group-size", "32")
    proc = run("convert", src, "--method", method, *group, "--calib-samples", "8",
               "--calib-len", "64", "--device", device, "-o", out, *extra)
    assert proc.returncode == 0, proc.stderr
    return out


@needs_cuda
@pytest.mark.parametrize("method,extra", [("gptq", ()), ("awq", ()), ("awq", ("--then", "gptq")),
                                          ("llm_int8", ()), ])
def test_calibrated_methods_on_cuda_match_cpu(tiny_llama, tmp_path, method, extra):
    """The whole pipeline on the GPU (blocks, activations, statistics, solves) writes an
    artifact whose quality equals the CPU run's, and the evaluator on the GPU agrees with
    itself on the CPU."""
    import json

    from quantbench.eval.run import evaluate_one

    if method == "llm_int8":
        extra = ("--format", "dense")
    cpu = _convert(tiny_llama, tmp_path / "cpu", method, "cpu", extra)
    gpu = _convert(tiny_llama, tmp_path / "gpu", method, "cuda", extra)
    assert "cuda" in json.loads((gpu / "quantbench.json").read_text())["summary"][
        "quantize_device"]
    results = {}
    for name, path in (("cpu", cpu), ("gpu", gpu)):
        for dev in ("cpu", "cuda"):
            results[name, dev] = only(evaluate_one(path, use_cache=False, device=dev,
                                                   max_tokens=2048))
    # the same artifact scored on either device: same numbers up to float32 rounding
    for name in ("cpu", "gpu"):
        assert abs(results[name, "cuda"].ppl / results[name, "cpu"].ppl - 1) < 1e-3
    # quantized on the GPU vs on the CPU: same quality within noise
    a, b = results["cpu", "cpu"], results["gpu", "cpu"]
    assert abs(b.ppl / a.ppl - 1) < 0.01, (a, b)
    assert b.kld_mean < 1.05 * a.kld_mean + 1e-4, (a, b)


@needs_cuda
def test_gptq_gguf_on_cuda(tiny_llama_wide, tmp_path):
    """GPTQ onto a GGUF type with --device cuda: Hessians on the GPU, the codec on the CPU."""
    out = tmp_path / "g"
    proc = run("convert", tiny_llama_wide, "--method", "gptq", "--type", "Q4_K_M",
               "--calib-samples", "4", "--calib-len", "64", "--device", "cuda", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert list(out.glob("*.gguf"))
    # evaluated on the GPU with llama.cpp's activation rounding, as on the CPU
    from quantbench.eval.run import evaluate_one
    ppl = {dev: only(evaluate_one(out, use_cache=False, device=dev, max_tokens=2048)).ppl
           for dev in ("cpu", "cuda")}
    assert abs(ppl["cuda"] / ppl["cpu"] - 1) < 1e-3, ppl


@needs_cuda
def test_plan_on_cuda(tiny_llama, tmp_path):
    import json

    proc = run("convert", tiny_llama, "--method", "gptq", "--group-size", "32", "--device",
               "cuda", "--plan", "--json", tmp_path / "plan.json", "-o", tmp_path / "q")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["device"] == "cuda" and plan["machine_gflops"] > 1000
    assert not (tmp_path / "q").exists()


@needs_cuda
@pytest.mark.parametrize("method,fmt", [("gptq", "gptq"), ("llm_int8", "bitsandbytes"),
                                        ("rtn", "gguf")])
def test_streamed_eval_on_cuda(tiny_llama, tmp_path, method, fmt):
    """Block-streamed evaluation with the blocks and heads on the GPU (hidden states on the
    host, moved per micro-batch; run-time modules — LLM.int8, GGUF activation rounding —
    moved with their block) scores as the CPU does."""
    from quantbench.eval.run import evaluate_one

    extra = ("--type", "Q4_K_M") if fmt == "gguf" else ("--format", fmt)
    out = _convert(tiny_llama, tmp_path / "q", method, "cpu", extra) if method != "rtn" else \
        tmp_path / "q"
    if method == "rtn":
        proc = run("convert", tiny_llama, "--method", "rtn", *extra, "-o", out)
        assert proc.returncode == 0, proc.stderr
    got = {(dev, s): evaluate_one(out, use_cache=False, device=dev, stream=s, max_tokens=2048)
           for dev in ("cpu", "cuda") for s in ("off", "on")}
    assert got["cuda", "on"].mode == "streamed"
    ref = only(got["cpu", "off"])
    for key, report in got.items():
        r = only(report)
        assert abs(r.ppl / ref.ppl - 1) < 1e-3, (key, r.ppl, ref.ppl)
        assert abs(r.kld_mean - ref.kld_mean) < 1e-3 * max(ref.kld_mean, 1e-3), key
