"""The CLI as a user meets it: a real subprocess, one-line errors, no partial output."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import make_tiny_llama


def run(*args, cwd=None):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "quantbench.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:"), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_convert_and_inspect(tiny_llama, tmp_path):
    out = tmp_path / "q"
    proc = run("convert", tiny_llama, "--method", "zeropoint", "--bits", "4", "--group-size", "32",
               "--format", "dense", "-o", out, "--json", tmp_path / "m.json")
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    assert json.loads((tmp_path / "m.json").read_text())["format"] == "dense"
    proc = run("inspect", out, "--tensors", "--json", tmp_path / "i.json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["format"] == "dense" and info["files_ok"] is True
    assert "model.layers.0.self_attn.q_proj.weight" in proc.stdout


@pytest.mark.parametrize("case", ["missing", "not_a_model", "truncated", "arch"])
def test_bad_sources(case, tmp_path):
    src = tmp_path / "src"
    if case == "not_a_model":
        src.mkdir()
        (src / "notes.txt").write_text("hello")
        needle = "no config.json"
    elif case == "truncated":
        make_tiny_llama(src, tokenizer=False)
        f = src / "model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
        needle = "truncated"
    elif case == "arch":
        make_tiny_llama(src, tokenizer=False)
        cfg = json.loads((src / "config.json").read_text())
        cfg["model_type"] = "bert"
        (src / "config.json").write_text(json.dumps(cfg))
        needle = "unsupported architecture"
    else:
        needle = "does not exist"
    out = tmp_path / "out"
    proc = run("convert", src, "-o", out)
    assert_one_line_error(proc, needle)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_group_size_that_cannot_work(tiny_llama, tmp_path):
    proc = run("convert", tiny_llama, "--group-size", "100000", "-o", tmp_path / "o")
    assert_one_line_error(proc, "group size 100000")
    proc = run("convert", tiny_llama, "--group-size", "-7", "-o", tmp_path / "o")
    assert_one_line_error(proc, "-1 (per output channel)")
    assert list(tmp_path.iterdir()) == []


def test_unknown_method_and_grid_conflict(tiny_llama, tmp_path):
    assert_one_line_error(run("convert", tiny_llama, "--method", "magic", "-o", tmp_path / "o"),
                          "unknown method 'magic'")
    assert_one_line_error(run("convert", tiny_llama, "--method", "absmax", "--zero-point",
                              "-o", tmp_path / "o"), "--method zeropoint")


def test_unwritable_output(tiny_llama, tmp_path):
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")  # a file where a directory would have to be created
    proc = run("convert", tiny_llama, "--group-size", "32", "-o", blocker / "sub" / "out")
    assert_one_line_error(proc, "cannot write")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # root ignores directory permissions
            assert_one_line_error(run("convert", tiny_llama, "-o", ro / "out"), "cannot write")
    finally:
        ro.chmod(0o700)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain-file", "ro"]


def test_output_is_a_file(tiny_llama, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    assert_one_line_error(run("convert", tiny_llama, "-o", target), "not a directory")
    assert target.read_text() == "x"


def test_eval_and_compare_on_tiny_model(tiny_llama, tmp_path):
    out = tmp_path / "q"
    assert run("convert", tiny_llama, "--group-size", "32", "-o", out).returncode == 0
    proc = run("eval", out, "--ctx", "64", "--max-tokens", "256", "--json", tmp_path / "e.json",
               "--no-cache")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["results"]["q"]["n_tokens"] == 4 * 63
    assert json.loads((out / "quantbench.json").read_text())["eval"]["ppl"] > 1
    proc = run("compare", tiny_llama, "--method", "absmax,zeropoint", "--bits", "8,4",
               "--group-size", "32", "--ctx", "64", "--max-tokens", "256", "--no-cache",
               "--json", tmp_path / "new" / "c.json", "--plot", tmp_path / "c.png")
    assert proc.returncode == 0, proc.stderr  # the JSON's folder is made when missing
    rows = json.loads((tmp_path / "new" / "c.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["baseline", "absmax-w8-g32", "absmax-w4-g32",
                                         "zeropoint-w8-g32", "zeropoint-w4-g32"]
    assert "zeropoint" in proc.stdout and (tmp_path / "c.png").stat().st_size > 1000


def test_eval_bad_data(tiny_llama, tmp_path):
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"nottext": 1}\n')
    assert_one_line_error(run("eval", tiny_llama, "--data", bad, "--no-cache"), "line 1")


def test_plan_estimates_and_writes_nothing(tiny_llama, tmp_path):
    out = tmp_path / "never"
    proc = run("convert", tiny_llama, "--method", "gptq", "--group-size", "32", "--calib-samples",
               "64", "-o", out, "--plan", "--json", tmp_path / "plan.json")
    assert proc.returncode == 0, proc.stderr
    assert "estimated time" in proc.stdout and "peak memory" in proc.stdout
    assert not out.exists()
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["calibration_tokens"] == 64 * 512 and plan["estimated_seconds"] > 0
    assert set(plan["parts_gflop"]) >= {"forwards", "hessians", "solves"}


def test_plan_grows_with_calibration(tiny_llama):
    from quantbench.calibration.plan import estimate
    from quantbench.models.loader import load_model
    from quantbench.quant.run import make_config

    model = load_model(tiny_llama)
    small = estimate(model, make_config("awq", 4, 32, False, calib_samples=8), gflops=10.0)
    large = estimate(model, make_config("awq", 4, 32, False, calib_samples=64), gflops=10.0)
    assert large.seconds > small.seconds and large.peak_bytes > small.peak_bytes
    rtn = estimate(model, make_config("zeropoint", 4, 32), gflops=10.0)
    assert rtn.tokens == 0 and rtn.seconds < small.seconds



def test_plan_counts_attention_values(tiny_llama):
    """GPTQ on GGUF types pays one more attention pass for its value Hessians; integer grids
    only when asked."""
    from quantbench.calibration.plan import estimate
    from quantbench.models.loader import load_model
    from quantbench.quant.run import make_config

    model = load_model(tiny_llama)

    def parts(**kw):
        return estimate(model, make_config("gptq", calib_samples=8, **kw), gflops=10.0).parts

    assert "attention values" in parts(gguf_type="Q4_K_M")
    assert "attention values" not in parts(gguf_type="Q4_K_M", attention_values=False)
    assert "attention values" not in parts(bits=4, group_size=32)
    assert "attention values" in parts(bits=4, group_size=32, attention_values=True)


def test_awq_via_cli_writes_the_awq_layout_and_search(tiny_llama, tmp_path):
    out = tmp_path / "awq"
    proc = run("convert", tiny_llama, "--method", "awq", "--bits", "4", "--group-size", "32",
               "--calib-samples", "4", "--calib-len", "32", "--awq-grid", "4", "--format", "awq",
               "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert (out / "awq_search.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "awq" and config["version"] == "gemm"
    again = tmp_path / "awq-again"
    proc = run("convert", tiny_llama, "--method", "awq", "--bits", "4", "--group-size", "32",
               "--search-file", out / "awq_search.safetensors", "--format", "awq", "-o", again)
    assert proc.returncode == 0, proc.stderr
    proc = run("convert", tiny_llama, "--method", "gptq", "--then", "rtn", "-o", tmp_path / "x")
    assert_one_line_error(proc, "takes no --then")


def test_compare_runs_calibrated_methods_with_their_options(tiny_llama, tmp_path):
    proc = run("compare", tiny_llama, "--method", "zeropoint,gptq,awq", "--bits", "4",
               "--group-size", "32", "--calib-samples", "4", "--calib-len", "32",
               "--static-groups", "--awq-grid", "4", "--max-tokens", "1024",
               "--json", tmp_path / "c.json", "--plot", "")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads((tmp_path / "c.json").read_text())["rows"]}
    assert {"zeropoint-w4-g32", "gptq-w4-g32", "awq-w4-g32"} <= set(rows)
    proc = run("compare", tiny_llama, "--method", "zeropoint", "--damp", "0.1")
    assert_one_line_error(proc, "takes no --damp")


def test_awq_then_gptq_takes_every_gptq_flag(tiny_llama, tmp_path):
    """Every GPTQ flag applies to AWQ's inner GPTQ (here planned, not run); a flag the
    inner method lacks is refused naming the ``--then`` that has it."""
    plan = tmp_path / "plan.json"
    proc = run("convert", tiny_llama, "--method", "awq", "--then", "gptq", "--bits", "4",
               "--group-size", "32", "--act-order", "--dynamic-groups", "--no-scale-search",
               "--attention-values", "--damp", "0.02", "--block-size", "64", "--plan",
               "--json", plan, "-o", tmp_path / "x")
    assert proc.returncode == 0, proc.stderr
    parts = json.loads(plan.read_text())["parts_gflop"]
    assert {"attention values", "solves", "scale search"} <= set(parts)
    proc = run("convert", tiny_llama, "--method", "awq", "--scale-search", "-o", tmp_path / "y")
    assert_one_line_error(proc, "--then rtn takes no --scale-search option", "--then gptq")
