"""Shared fixtures: tiny random llama checkpoints built in-process (no downloads)."""
from __future__ import annotations

import gzip
import importlib.resources
import os
from pathlib import Path

import pytest
import torch

TINY_VOCAB = 320

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on the 2-core machine: one compute thread each (and in the
    # processes they start), instead of two workers contending with two threads each
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def _wikitext_head(chars: int = 200_000) -> str:
    data = importlib.resources.files("quantbench") / "data" / "wikitext-2-raw-test.txt.gz"
    with data.open("rb") as fh:
        return gzip.decompress(fh.read()).decode("utf-8")[:chars]


def make_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer trained on a slice of the bundled text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = _wikitext_head()
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(directory))


def make_tiny_llama(directory: Path, dtype=torch.float16, tied: bool = False,
                    shard_bytes: int | None = None, tokenizer: bool = True, seed: int = 0,
                    layers: int = 2, hidden: int = 64, intermediate: int = 128) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=tied,
                      bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(cfg).to(dtype)
    kwargs = {"max_shard_size": shard_bytes} if shard_bytes else {}
    model.save_pretrained(str(directory), **kwargs)
    if tokenizer:
        make_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama-tied", tied=True)


@pytest.fixture(scope="session")
def sample():
    """The real sample model (SmolLM2-135M-Instruct, converted once and cached); slow tests only."""
    from quantbench.models.loader import load_model
    return load_model("sample:smollm2")


def _bnb_reference_path(model) -> list:
    """Turn off bitsandbytes' fused bfloat16 CPU kernel (used from 0.49 on CPUs with
    AVX512-BF16) so the 4-bit layers dequantize and compute in their own dtype, the path our
    evaluator follows; returns the modules switched, to switch back with ``m.support_... = True``."""
    fused = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for m in fused:
        m.support_avx512bf16_for_cpu = False
    return fused


@pytest.fixture
def bnb_reference_path():
    return _bnb_reference_path


def rewrite_gguf(source: Path, out: Path, keep_tensor=lambda name: True,
                 extra: dict | None = None, kvs: dict | None = None) -> Path:
    """``source`` written again by gguf-py: metadata as is (``kvs``: keys given new values of
    their own type, None dropping one), only the tensors ``keep_tensor`` accepts, ``extra``
    (name → float32 array) written first — files quantbench's writer would not make (a tensor
    missing, llama.cpp's generated ``rope_freqs``, a key changed)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = (kvs or {}).get(key, field.contents())
        if value is not None:
            writer.add_key_value(key, value, vtype, sub_type=sub)
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    for t in reader.tensors:
        if keep_tensor(t.name):
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def bnb_float_model(path):
    """transformers + bitsandbytes running our ``bitsandbytes`` file on the CPU as our evaluator
    computes it: float layers in float32, 4-bit layers on their reference path."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu")
    for p in hf.parameters():
        if p.dtype == torch.float16:
            p.data = p.data.float()
    _bnb_reference_path(hf)
    return hf


PEER_GPTQMODEL = Path(os.environ.get("QUANTBENCH_PEER_GPTQMODEL",
                                    "/work/peers/gptqmodel/bin/python"))
needs_gptqmodel = pytest.mark.skipif(
    not PEER_GPTQMODEL.is_file(), reason=f"GPTQModel peer venv not found at {PEER_GPTQMODEL} "
    "(set QUANTBENCH_PEER_GPTQMODEL; see benchmarks/peers/README.md)")


def assert_gptqmodel_reloads(out: Path, ids: torch.Tensor, ours: torch.Tensor,
                             work: Path, script: str = "transformers_logits.py") -> None:
    """transformers + GPTQModel's CPU kernels (the peer venv) load our gptq / awq file ``out``,
    quantize the linears our file says it quantized, and give ``ours`` logits up to their
    float16 arithmetic (the bounds of tests/formats/test_gptq/awq_runtime.py). ``script``:
    ``gptqmodel_logits.py`` loads with ``GPTQModel.load`` instead (mixture-of-experts)."""
    import json
    import subprocess

    from safetensors import safe_open
    from safetensors.torch import load_file

    from quantbench.formats.io import open_artifact

    (work / "ids.json").write_text(json.dumps(ids.tolist()))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "peers" / script
    logits = work / "peer-logits.safetensors"
    proc = subprocess.run([str(PEER_GPTQMODEL), str(script), str(out), str(work / "ids.json"),
                           str(logits)], check=False, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with safe_open(str(logits), "pt") as fh:
        quantized = fh.metadata()["quantized"].split(",")
    assert sorted(f"{m}.weight" for m in quantized) == sorted(open_artifact(out).quantized_names)
    theirs = load_file(str(logits))["logits"]
    assert (ours - theirs).abs().max() < 2e-2 * theirs.abs().max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.95


@pytest.fixture(scope="session")
def llamacpp():
    """llama.cpp built from the llama-cpp-python sdist (``make test`` builds it first)."""
    from quantbench.runtimes import llamacpp

    found = llamacpp.find()
    if found is None:
        pytest.skip("llama.cpp is not built: run `python -m quantbench.runtimes.llamacpp` "
                    "(make test does it first)")
    return found


@pytest.fixture(scope="session")
def ggml_quantize(llamacpp):
    """``ggml_quantize(type_name, x, imatrix=None) -> np.ndarray[uint8]``: llama.cpp's own
    ``ggml_quantize_chunk`` (libggml-base, through ctypes) on float32 rows ``x`` [rows, cols];
    ``imatrix`` is a float32 vector of length cols (llama.cpp's quant_weights)."""
    import ctypes

    import gguf
    import numpy as np

    lib = ctypes.CDLL(str(llamacpp.libggml_base))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]

    def run(type_name: str, x, imatrix=None):
        qtype = gguf.GGMLQuantizationType[type_name]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        rows, cols = x.shape
        out = np.zeros(rows * cols // block * size, dtype=np.uint8)
        imp = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        lib.ggml_quantize_init(int(qtype))
        written = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows,
                                          cols, None if imp is None else imp.ctypes.data)
        assert written == out.nbytes, (written, out.nbytes)
        return out.reshape(rows, -1)
    return run


@pytest.fixture(scope="session")
def tiny_llama_wide(tmp_path_factory) -> Path:
    """Rows of 256 and 512: whole GGUF k-quant super-blocks (the 64-wide tiny falls back)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama-wide", hidden=256,
                           intermediate=512, layers=3)


@pytest.fixture(scope="session")
def eval_text_file(tmp_path_factory) -> Path:
    """The bundled WikiText-2 test text as a file, for llama-perplexity."""
    path = tmp_path_factory.mktemp("evaltext") / "wiki.test.raw"
    path.write_text(_wikitext_head(chars=10**9))
    return path


@pytest.fixture
def llama_vs_ours(llamacpp, eval_text_file, tmp_path):
    """``llama_vs_ours(artifact_dir, baseline_model, ctx, chunks)`` → (our perplexity,
    llama-perplexity's, llama.cpp's tokens == our evaluator's), on the same windows with
    llama.cpp's second-half scoring."""
    from quantbench.eval.evaluator import prepare_windows
    from quantbench.eval.protocol import EvalProtocol
    from quantbench.eval.run import evaluate_one
    from quantbench.runtimes.llamacpp import base_tokens, perplexity

    def run(artifact: Path, baseline, ctx: int, chunks: int):
        protocol = EvalProtocol(ctx=ctx, max_tokens=None, n_windows=chunks, scoring="half")
        ours = evaluate_one(artifact, baseline=baseline, protocol=protocol, use_cache=False)
        saved = tmp_path / f"{Path(artifact).name}.kld"
        theirs = perplexity(llamacpp, Path(artifact) / "model.gguf", eval_text_file, ctx=ctx,
                            chunks=chunks, save_base=saved)
        windows, _ = prepare_windows(baseline.tokenizer(), protocol)
        theirs_tokens = torch.tensor(base_tokens(saved)).reshape(windows.shape)
        # llama-perplexity saves each chunk's tokens before it overwrites the first with BOS
        same = torch.equal(theirs_tokens[:, 1:], windows[:, 1:]) and (
            torch.equal(theirs_tokens[:, 0], windows[:, 0]) or bool(
                (windows[:, 0] == baseline.tokenizer().bos_token_id).all()))
        saved.unlink()
        return next(iter(ours.results.values())).ppl, theirs.ppl, same
    return run


# -- scheduling under `make test` (pytest-xdist, two workers) --------------------------------
# Each module runs on one worker (its module-scoped fixtures, e.g. a quantized sample model,
# are built once), except the README's command chains and the notebooks, which are
# independent and the longest single tests: they are scheduled one by one. Slow units first,
# so the two workers finish together.
INDEPENDENT = ("tests/test_readme.py::test_cli_examples_run_in_order",
               "tests/test_notebooks.py::test_notebook_runs")


def _unit(nodeid: str) -> str:
    return nodeid if nodeid.startswith(INDEPENDENT) else nodeid.split("::")[0]


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    slow = {_unit(i.nodeid) for i in items if i.get_closest_marker("slow")}
    order = {unit: n for n, unit in enumerate(dict.fromkeys(_unit(i.nodeid) for i in items))}
    items.sort(key=lambda i: (_unit(i.nodeid) not in slow,
                              not i.nodeid.startswith(INDEPENDENT), order[_unit(i.nodeid)]))


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pytest-xdist not installed: tests run in one process
    pass
else:
    class _UnitScheduling(LoadScopeScheduling):
        """Whole modules (or single independent tests) as work units, in collection order
        (xdist's own ``loadgroup`` marks need a writable node id, which pytest 9 lacks)."""

        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    def pytest_xdist_make_scheduler(config, log):
        return _UnitScheduling(config, log)
