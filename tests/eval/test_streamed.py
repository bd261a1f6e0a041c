"""Block-streamed evaluation (``eval/streamed.py``) equals the whole-model evaluator.

For every format's reader (run-time semantics included: LLM.int8's outlier matmul, llama.cpp's
activation rounding in GGUF files) and every family's layout (Gemma's scaled embeddings, soft-
capping and alternating sliding-window layers, Qwen3's q/k norms, Phi-3's fused projections,
routed experts, a multimodal checkpoint's text part), scoring the same artifact block by block
gives the whole model's perplexity, KLD and top-1; spilled hidden states give the same again
and leave no file behind; memory does not grow with the number of layers.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from quantbench.api import quantize, save
from quantbench.errors import EvalError
from quantbench.eval import budget, streamed
from quantbench.eval.evaluator import evaluate
from quantbench.eval.protocol import EvalProtocol
from quantbench.eval.sources import artifact_factory, source_factory
from quantbench.formats.io import open_artifact
from quantbench.models.loader import load_model
from tests.conftest import make_tiny_llama

PROTOCOL = EvalProtocol(ctx=64, max_tokens=640, batch_size=3)  # 10 windows, a short last batch
CALIB = {"calib_samples": 4, "calib_len": 32}


def both_modes(model, artifacts: dict[str, Path], protocol: EvalProtocol = PROTOCOL, **kw):
    """The same evaluation whole and streamed (no baseline cache: each computes it)."""
    def run(stream):
        cands = {name: artifact_factory(open_artifact(p)) for name, p in artifacts.items()}
        return evaluate(source_factory(model), cands, model.tokenizer(), protocol,
                        model.fingerprint(), progress=False, stream=stream, **kw)
    return run("off"), run("on")


def assert_same(whole, stream, exact: bool = True):
    assert (whole.mode, stream.mode) == ("whole", "streamed")
    tol = {"rel": 0, "abs": 0} if exact else {"rel": 1e-5, "abs": 1e-7}
    assert stream.baseline.ppl == pytest.approx(whole.baseline.ppl, **tol)
    assert stream.baseline.n_tokens == whole.baseline.n_tokens
    assert set(stream.results) == set(whole.results) and not stream.errors
    for name, w in whole.results.items():
        s = stream.results[name]
        assert (s.n_tokens, s.top1) == (w.n_tokens, w.top1), name
        for field in ("ppl", "kld_mean", "kld_p99"):
            assert getattr(s, field) == pytest.approx(getattr(w, field), **tol), (name, field)


# ------------------------------------------------------------------------- every format

FORMATS = {  # name: (quantize options, format)
    "dense": ({"method": "zeropoint", "bits": 4, "group_size": 32}, "dense"),
    "compressed-tensors": ({"method": "absmax", "bits": 4, "group_size": 32},
                           "compressed-tensors"),
    "gptq": ({"method": "gptq", "bits": 4, "group_size": 32, **CALIB}, "gptq"),
    "awq": ({"method": "awq", "bits": 4, "group_size": 32, **CALIB}, "awq"),
    "nf4": ({"method": "nf4"}, "bitsandbytes"),
    "llm_int8": ({"method": "llm_int8", "calib_samples": 2, "calib_len": 64}, "bitsandbytes"),
    "gguf": ({"method": "imatrix", "gguf_type": "Q4_K_M", **CALIB}, "gguf"),
    "exl2": ({"method": "exl2", "bpw": 4.6, "batch_size": 2, "measure_samples": 4, **CALIB},
             "exl2"),
}


@pytest.fixture(scope="module")
def llama_artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    src = make_tiny_llama(root / "src", dtype=torch.float16)
    model = load_model(src)
    out = {}
    for name, (options, fmt) in FORMATS.items():
        q = quantize(model, progress=False, **options)
        out[name] = save(q, root / name, format=fmt, progress=False)
    return model, out


def test_every_format_streamed_equals_whole(llama_artifacts):
    """All formats as candidates of one lock-step evaluation (one after another when
    streamed), bit for bit the same numbers."""
    model, artifacts = llama_artifacts
    assert_same(*both_modes(model, artifacts))


def test_spilled_hidden_states_equal_and_leave_nothing(llama_artifacts, tmp_path):
    model, artifacts = llama_artifacts
    spill = tmp_path / "spill"
    spill.mkdir()
    seen = []
    real = streamed.HiddenStore.__init__

    def spy(self, shape, folder=None):
        real(self, shape, folder)
        seen.append(self.path)
    pick = {k: artifacts[k] for k in ("gptq", "gguf")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(streamed.HiddenStore, "__init__", spy)
        whole, stream = both_modes(model, pick, spill=spill)
    assert_same(whole, stream)
    assert seen and all(p is not None and p.parent.parent == spill for p in seen)
    assert list(spill.iterdir()) == []  # the private folder and its files are gone


def test_at_most_one_block_is_materialized(llama_artifacts):
    """While a model streams, every block but the one running is on the meta device."""
    model, artifacts = llama_artifacts
    live = []
    real = streamed.StreamedLM._load

    def spy(self, path):
        module = real(self, path)
        layers = self.skeleton.get_submodule(self.arch.block_prefix)
        live.append(sum(not next(layer.parameters()).is_meta for layer in layers))
        return module
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(streamed.StreamedLM, "_load", spy)
        both_modes(model, {"gptq": artifacts["gptq"]})
    assert live and max(live) == 1


def test_non_finite_candidate_streamed_is_its_error(llama_artifacts, tmp_path):
    """A candidate that turns NaN on some window gets the same error streamed as whole, and
    the baseline still gets its result."""
    model, artifacts = llama_artifacts
    art = open_artifact(artifacts["dense"])
    name = art.plain_names[0] if "model.norm.weight" not in art.plain_names \
        else "model.norm.weight"

    def broken(names=None, real=art.dequantized):
        for n, t in real(names):
            yield n, (torch.full_like(t, float("inf")) if n == name else t)
    reports = []
    for stream in ("off", "on"):
        source = artifact_factory(art)
        source.read = broken
        reports.append(evaluate(source_factory(model), {"bad": source}, model.tokenizer(),
                                PROTOCOL, model.fingerprint(), progress=False, stream=stream))
    whole, stream = reports
    assert whole.errors == stream.errors and "bad" in stream.errors and not stream.results
    assert stream.baseline.ppl == whole.baseline.ppl


# ------------------------------------------------------------------------- every family

def _family(kind: str, root: Path) -> Path:
    from tests.models import moe_tiny
    from tests.models.test_family_gemma import make_tiny_gemma
    from tests.models.test_family_gemma3_multimodal import make_tiny_gemma3_mm
    from tests.models.test_family_phi3 import make_tiny_phi3
    from tests.models.test_family_qwen3 import make_tiny_qwen3

    path = root / kind
    if kind in ("gemma2", "gemma3"):
        return make_tiny_gemma(path, kind)
    if kind in ("mixtral", "qwen3_moe"):
        return moe_tiny.make_tiny_moe(kind, path)
    return {"qwen3": make_tiny_qwen3, "phi3": make_tiny_phi3,
            "gemma3-multimodal": make_tiny_gemma3_mm}[kind](path)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "qwen3", "phi3", "mixtral", "qwen3_moe",
                                  "gemma3-multimodal"])
def test_every_family_streamed_equals_whole(kind, tmp_path):
    model = load_model(_family(kind, tmp_path))
    q = quantize(model, method="gptq", bits=4, group_size=32, progress=False, **CALIB)
    out = save(q, tmp_path / "q", format="compressed-tensors", progress=False)
    protocol = EvalProtocol(ctx=32, max_tokens=256, batch_size=2)
    assert_same(*both_modes(model, {"q": out}, protocol), exact=False)


# ---------------------------------------------------------------------- choice and memory

def test_auto_streams_when_the_models_do_not_fit(llama_artifacts):
    model, _ = llama_artifacts
    src = source_factory(model)
    small = budget.estimate(src, 2, 10, 64, 1)
    assert small.mode == "whole"
    # room for the streamed hidden states but not two whole models: streamed in memory
    room = int((small.streamed_bytes + 1) / budget.MEMORY_SHARE)
    tight = budget.estimate(src, 2, 10, 64, 1, available=room)
    assert (tight.mode, tight.spill) == ("streamed", False) and small.whole_bytes > room * 0.8
    # less: the hidden states spill
    less = int((tight.spilled_bytes + 1) / budget.MEMORY_SHARE)
    spilled = budget.estimate(src, 2, 10, 64, 1, available=less)
    assert (spilled.mode, spilled.spill) == ("streamed", True) and spilled.spill_file_bytes
    with pytest.raises(EvalError, match="lower --ctx"):
        budget.estimate(src, 2, 10, 64, 1, available=less // 4)
    assert budget.estimate(src, 2, 10, 64, 1, stream="off", available=1).mode == "whole"
    assert budget.estimate(src, 2, 10, 64, 1, stream="on").mode == "streamed"


# the child's own peak: VmHWM belongs to its address space (getrusage's ru_maxrss would carry
# this test process's peak over the exec)
_RSS = """
import sys
from quantbench.eval.run import evaluate_one
evaluate_one(sys.argv[1], use_cache=False, progress=False, stream=sys.argv[2], ctx=64,
             max_tokens=256)
status = open("/proc/self/status").read().split("VmHWM:")[1]
print(status.split()[0])
"""


def _peak_rss_mb(path: Path, stream: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _RSS, str(path), stream], env=env, check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[-1]) / 1024


@pytest.mark.slow
def test_streamed_peak_memory_does_not_grow_with_layers(tmp_path):
    """A model of 4 and one of 28 wide layers (17 MB of float32 each): evaluated whole, the
    peak grows by the 24 extra layers (~400 MB); streamed, by less than a tenth of that — the
    source alone, and a Q8_0 GGUF of it against the source (its tensors read from the file
    one block at a time, not through a memory map that would keep the pages resident)."""
    peaks = {}
    for layers in (4, 28):
        path = make_tiny_llama(tmp_path / f"l{layers}", dtype=torch.float16, hidden=512,
                               intermediate=2048, layers=layers)
        gguf = save(quantize(load_model(path), method="rtn", gguf_type="Q8_0", progress=False),
                    tmp_path / f"l{layers}.gguf", format="gguf", progress=False)
        peaks[layers] = {s: _peak_rss_mb(path, s) for s in ("off", "on")}
        peaks[layers]["gguf"] = _peak_rss_mb(gguf, "on")
    extra = 24 * 17
    assert peaks[28]["off"] - peaks[4]["off"] > 0.8 * extra
    assert peaks[28]["on"] - peaks[4]["on"] < 0.1 * extra, peaks
    assert peaks[28]["gguf"] - peaks[4]["gguf"] < 0.1 * extra, peaks


def test_eval_plan_prints_the_estimate(llama_artifacts, tmp_path):
    from click.testing import CliRunner

    from quantbench.cli import cli

    _, artifacts = llama_artifacts
    result = CliRunner().invoke(cli, ["eval", str(artifacts["gptq"]), "--plan", "--ctx", "64",
                                      "--json", str(tmp_path / "plan.json")])
    assert result.exit_code == 0, result.output
    assert "whole model" in result.output and "streamed" in result.output
    import json

    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["mode"] == "whole" and plan["models"] == 2 and plan["whole_bytes"] > 0


def test_spill_folders_of_killed_runs_are_swept(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / f"{streamed.SPILL_PREFIX}999999999.1-dead"
    dead.mkdir()
    (dead / "hidden-x").write_bytes(b"0" * 16)
    stores = streamed.Stores(True)
    assert not dead.exists() and stores.folder.parent == tmp_path
    stores.close()
    assert list(tmp_path.iterdir()) == []


def test_refusals_say_what_to_lower(llama_artifacts, monkeypatch):
    model, _ = llama_artifacts
    src = source_factory(model)
    tiny = budget.estimate(src, 2, 10, 64, 1)
    with pytest.raises(EvalError, match="QUANTBENCH_LOGITS_MB.*or free memory"):
        budget.estimate(src, 2, 10, 64, 1, available=int(tiny.spilled_bytes / 2))
    room = int((tiny.spilled_bytes + 1) / budget.MEMORY_SHARE)
    monkeypatch.setattr("shutil.disk_usage", lambda path: type("U", (), {"free": 10})())
    with pytest.raises(EvalError, match="spill space .* set TMPDIR"):
        budget.estimate(src, 2, 10, 64, 1, available=room)


def test_logits_chunk_from_the_environment(monkeypatch):
    from quantbench.eval.evaluator import chunk_rows

    assert chunk_rows(32768) == 512
    monkeypatch.setenv("QUANTBENCH_LOGITS_MB", "1")
    assert chunk_rows(32768) == 8
    monkeypatch.setenv("QUANTBENCH_LOGITS_MB", "lots")
    with pytest.raises(EvalError, match="QUANTBENCH_LOGITS_MB must be a number"):
        chunk_rows(32768)


@pytest.mark.slow
def test_sample_streamed_equals_whole(sample, tmp_path):
    """The bundled SmolLM2 and a GPTQ artifact of it, 2048 tokens: the same numbers."""
    q = quantize(sample, method="gptq", bits=4, group_size=64, progress=False, **CALIB)
    out = save(q, tmp_path / "q", format="gptq", progress=False)
    whole, stream = both_modes(sample, {"q": out}, EvalProtocol(ctx=256, max_tokens=2048))
    assert_same(whole, stream)


def test_candidate_that_cannot_be_read_is_its_error_and_leaves_no_spill(llama_artifacts,
                                                                       tmp_path):
    """A tensor of block 1 that cannot be read: whole, the candidate is not built; streamed,
    it fails after block 0 — the same error either way, the other candidate still scored,
    and the spill folder empty afterwards."""
    from quantbench.errors import FormatError

    model, artifacts = llama_artifacts
    spill = tmp_path / "spill"
    spill.mkdir()
    reports = []
    for stream in ("off", "on"):
        art = open_artifact(artifacts["dense"])

        def damaged(names=None, real=art.dequantized):
            for n, t in real(names):
                if n.startswith("model.layers.1."):
                    raise FormatError(f"{n} is damaged")
                yield n, t
        bad = artifact_factory(art)
        bad.read = damaged
        cands = {"bad": bad, "good": artifact_factory(open_artifact(artifacts["gptq"]))}
        reports.append(evaluate(source_factory(model), cands, model.tokenizer(), PROTOCOL,
                                model.fingerprint(), progress=False, stream=stream,
                                spill=spill if stream == "on" else None))
    whole, stream = reports
    assert whole.errors == stream.errors and "damaged" in stream.errors["bad"]
    assert stream.results["good"].kld_mean == whole.results["good"].kld_mean
    assert list(spill.iterdir()) == []


def test_cli_eval_and_compare_take_stream(llama_artifacts, tmp_path):
    """``eval --stream on`` reports the streamed mode with the whole mode's numbers; ``compare
    --stream on`` streams its baseline and every artifact it wrote."""
    import json

    from click.testing import CliRunner

    from quantbench.cli import cli

    model, artifacts = llama_artifacts
    runner, reports = CliRunner(), {}
    for stream in ("off", "on"):
        path = tmp_path / f"eval-{stream}.json"
        result = runner.invoke(cli, ["eval", str(artifacts["awq"]), "--baseline", str(model.path),
                                     "--ctx", "64", "--max-tokens", "640", "--no-cache",
                                     "--stream", stream, "--json", str(path)])
        assert result.exit_code == 0, result.output
        reports[stream] = json.loads(path.read_text())
    assert (reports["off"]["mode"], reports["on"]["mode"]) == ("whole", "streamed")
    assert reports["on"]["results"]["awq"]["kld_mean"] == \
        reports["off"]["results"]["awq"]["kld_mean"]
    out = tmp_path / "compare.json"
    result = runner.invoke(cli, ["compare", str(model.path), "-m", "absmax", "-b", "4",
                                 "--ctx", "64", "--max-tokens", "256", "--no-cache",
                                 "--stream", "on", "--json", str(out), "--plot", ""])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["mode"] == "streamed"


def test_full_disk_while_spilling_is_one_clear_error(tmp_path, monkeypatch):
    store = streamed.Stores(tmp_path)
    hidden = store.new((2, 4, 8))

    def full(fd, data, offset):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(EvalError, match="No space left on device.*set TMPDIR"):
        hidden.write(0, torch.ones(1, 4, 8))
    hidden.close()
    store.close()
    assert list(tmp_path.iterdir()) == []
