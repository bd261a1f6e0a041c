"""Write the notebooks of this folder from the cells below, without outputs.

    python notebooks/build.py            # regenerate 01_*.ipynb, 02_*.ipynb, 03_*.ipynb
    python notebooks/build.py --check    # exit 1 if a notebook differs from what this writes

Edit the cells here, not the .ipynb files; ``tests/test_notebooks.py`` executes every notebook
and checks that the files in git are what this script writes (stripped of outputs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = '''\
import warnings
from pathlib import Path

import torch
from IPython.display import Image, Markdown, display

import quantbench as qb

warnings.filterwarnings("ignore", message="IProgress not found")  # no Jupyter widgets needed

def table(header, rows):
    """A Markdown table: header names, then one tuple of cells per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    display(Markdown("\\n".join(lines)))
'''

QUICKSTART = [
    ("md", """\
# Quickstart: quantize, evaluate, inspect

The bundled sample model (`sample:smollm2`, SmolLM2-135M-Instruct in FP16) quantized to 4-bit
integers with a zero-point per group of 64 weights, written in the `compressed-tensors` layout
(what vLLM and transformers load), read back, and compared with the FP16 baseline on the same
tokens. About a minute on two CPU cores."""),
    ("code", SETUP + '''
OUT = Path("out/notebooks/01")
model = qb.load_model("sample:smollm2")
print(model.source, "·", model.config["model_type"], "·", model.num_blocks, "blocks ·",
      model.dtype)'''),
    ("md", """\
`quantize` checks the combination (method, grid, targets) and quantizes block by block (one
block in memory; a progress bar counts the blocks, `progress=False` silences it); the result is
kept, so `save` can write it in one format or several without quantizing again. Each output
directory appears only when complete."""),
    ("code", '''\
q = qb.quantize(model, method="zeropoint", bits=4, group_size=64)
path = qb.save(q, OUT / "zeropoint-w4g64", format="compressed-tensors", overwrite=True)
print(len(q.targets), "linears quantized →", path)'''),
    ("md", """\
## Evaluate

Perplexity on the WikiText-2 test text, and against the FP16 baseline on the same tokens the
mean KL divergence of the next-token distributions and how often the top-1 token agrees. The
artifact is read back through its format's reader: what is measured is what was written.
2048 tokens keep this quick (the CLI's default is 16384); the baseline's perplexity is cached."""),
    ("code", '''\
report = qb.evaluate(path, max_tokens=2048)
r = report.results[path.name]
print(report.describe())
table(["model", "ppl", "Δppl %", "KLD mean", "KLD p99", "top-1 %"], [
    ("FP16 baseline", f"{report.baseline.ppl:.3f}", "", "", "", ""),
    (path.name, f"{r.ppl:.3f}", f"{r.delta_ppl_pct:+.2f}", f"{r.kld_mean:.4f}",
     f"{r.kld_p99:.3f}", f"{100 * r.top1:.1f}")])'''),
    ("md", """\
## Inspect

`inspect` reads the manifest (`quantbench.json`) and the files: format, size, bits per weight
(codes plus scales and zero-points, over the quantized linears and over all weights), whether
every file still matches its recorded checksum, and the evaluation just recorded."""),
    ("code", '''\
info = qb.inspect(path)
table(["key", "value"], [(k, info[k]) for k in (
    "format", "size_bytes", "quantized_weights", "bits_per_weight_quantized", "bits_per_weight",
    "files_ok")] + [("eval: Δppl %", f"{info['eval']['delta_ppl_pct']:+.2f}")])
table(["tensor", "shape", "dtype", "grid", "bits/weight"],
      [(t["name"], "×".join(map(str, t["shape"])), t["dtype"], t["grid"] or "",
        t["bits_per_weight"]) for t in info["tensors"][:8]])'''),
    ("md", """\
## One tensor, read back

The reader returns codes, scales and zero-points; `dequantize` gives `scale·(code − zero)`,
the weights a runtime computes with."""),
    ("code", '''\
from quantbench.formats.io import open_artifact

art = open_artifact(path)
name = "model.layers.0.self_attn.q_proj.weight"
qt = art.quantized(name)
w, wq = model.weights.get(name).float(), qt.dequantize(torch.float32)
print(qt.grid.describe(), "· codes", tuple(qt.codes.shape), "· scales", tuple(qt.scales.shape),
      "· zeros", tuple(qt.zeros.shape))
print(f"relative error ‖Ŵ − W‖ / ‖W‖ = {((wq - w).norm() / w.norm()).item():.4f}")
print("codes of the first group:", qt.codes[0, :64].tolist())'''),
    ("md", """\
Next: `02_methods_compared.ipynb` (absmax, zero-point, GPTQ, AWQ, NF4, LLM.int8 side by side)
and `03_formats_and_runtimes.ipynb` (every format, read back and loaded by a runtime)."""),
]

METHODS = [
    ("md", """\
# Methods compared at 4 bits

Every quantization method on the sample model at 4 bits (group 64), written, read back and
evaluated in one lock-step pass against the FP16 baseline:

* `absmax`, `zeropoint`: round-to-nearest, symmetric or with a zero-point; no data;
* `gptq`: error feedback through the Hessian of calibration activations;
* `awq`: activation-aware scales folded into the preceding norms and linears, then rounding;
* `nf4`: bitsandbytes' 4-bit normal-float codebook with one absmax per block of 64;
* `llm_int8`: int8 rows by definition (shown at 8 bits, as the reference point it is).

GPTQ and AWQ calibrate on 4 windows of 128 tokens here (and AWQ searches 10 scale exponents
instead of 20) to stay within a few minutes on two CPU cores; real runs use 128 × 512
(`calib_samples`, `calib_len`), which helps them more. Each method keeps its own grid kind:
`absmax` and `gptq` are symmetric (compare them with each other), `zeropoint` and `awq` have
zero-points, `nf4` is a codebook."""),
    ("code", SETUP + '''
from quantbench.registry import method_names

OUT = Path("out/notebooks/02")
print("registered methods:", ", ".join(method_names()))
METHODS = [m for m in ("absmax", "zeropoint", "gptq", "awq", "nf4", "llm_int8")
           if m in method_names()]'''),
    ("md", """\
`compare` writes each method in `compressed-tensors` when that layout can hold it and in the
method's own layout otherwise (`bitsandbytes` for NF4 and LLM.int8). Calibration options go to
the methods that take them."""),
    ("code", '''\
result = qb.compare("sample:smollm2", methods=METHODS, bits=[4], group_size=64,
                    fmt="compressed-tensors", out_dir=OUT, max_tokens=1024,
                    method_options={"calib_samples": 4, "calib_len": 128, "search_samples": 4,
                                    "n_grid": 10})
print(result.report.describe())'''),
    ("code", '''\
def num(value, spec):
    return "—" if value is None else format(value, spec)


table(["method", "bits", "bits/weight", "size (MB)", "ppl", "Δppl %", "KLD", "top-1 %",
       "write (s)"],
      [(r.method if r.name != "baseline" else "FP16 baseline", r.bits,
        num(r.bits_per_weight, ".3f"), num(r.size_bytes / 1e6, ".1f"), num(r.ppl, ".3f"),
        num(r.delta_ppl_pct, "+.2f"), num(r.kld_mean, ".4f"), num(100 * r.top1, ".1f"),
        num(r.seconds, ".1f")) for r in result.rows])'''),
    ("md", """\
## Size against quality

File size (embeddings and norms stay FP16 and are included) against the perplexity increase;
lower and further left is better."""),
    ("code", '''\
from quantbench.eval.report import plot_size_vs_quality

plot = OUT / "size_vs_quality.png"
plot_size_vs_quality(result.rows, plot, "sample:smollm2 — methods at 4 bits (group 64)")
display(Image(filename=str(plot)))'''),
    ("md", """\
The same comparison from the shell: `quantbench compare sample:smollm2 --method
absmax,zeropoint,gptq,awq,nf4 --bits 4 --group-size 64 --calib-samples 4 --calib-len 128`.
Each artifact stays in `out/notebooks/02/` with its evaluation recorded in `quantbench.json`."""),
]

FORMATS = [
    ("md", """\
# Formats and runtimes

One model written in every format quantbench has — `dense`, `compressed-tensors`, `gptq`,
`awq`, `bitsandbytes`, `gguf`, `exl2` — each read back by quantbench and evaluated, then loaded
by the runtime that runs it on a CPU:

| format | runtime used here (CPU) | other runtimes |
|---|---|---|
| `dense` | transformers | anything that loads an FP16 checkpoint |
| `compressed-tensors` | transformers + compressed-tensors | vLLM (GPU) |
| `bitsandbytes` | transformers + bitsandbytes | the same on GPU |
| `gguf` | llama.cpp (when built: `make llamacpp`) | llama.cpp on GPU, ollama, LM Studio |
| `gptq` | — | GPTQModel, vLLM, exllamav2 (GPU); GPTQModel's CPU kernels (separate venv) |
| `awq` | — | vLLM, GPTQModel (GPU); GPTQModel's CPU AWQ kernels (separate venv) |
| `exl2` | — | exllamav2 / TabbyAPI: **CUDA GPU only** |

A few minutes on two CPU cores; the EXL2 file is the slow one (GPTQ on 4 × 128 calibration
tokens)."""),
    ("code", SETUP + '''
from quantbench.formats.io import open_artifact

OUT = Path("out/notebooks/03")
model = qb.load_model("sample:smollm2")'''),
    ("md", """\
## Write

The four integer layouts hold the *same* codes: one 4-bit zero-point quantization (group 64)
saved four times. NF4 goes to `bitsandbytes`, llama.cpp's `Q4_K_M` mixture to `gguf`, and a
4-bit EXL2 quantization (GPTQ on exllamav2's grid, group 128) to `exl2`."""),
    ("code", '''\
rtn = qb.quantize(model, method="zeropoint", bits=4, group_size=64)
paths = {fmt: qb.save(rtn, OUT / fmt, format=fmt, overwrite=True)
         for fmt in ("dense", "compressed-tensors", "gptq", "awq")}
paths["bitsandbytes"] = qb.save(qb.quantize(model, method="nf4"), OUT / "bitsandbytes",
                                format="bitsandbytes", overwrite=True)
paths["gguf"] = qb.save(qb.quantize(model, method="rtn", gguf_type="Q4_K_M"), OUT / "gguf",
                        format="gguf", overwrite=True)
paths["exl2"] = qb.save(qb.quantize(model, method="exl2", bits=4, group_size=128,
                                    calib_samples=4, calib_len=128),
                        OUT / "exl2", format="exl2", overwrite=True)
table(["format", "files"], [(fmt, ", ".join(sorted(p.name for p in path.iterdir())))
                            for fmt, path in paths.items()])'''),
    ("md", """\
## Read back with quantbench

Each directory is opened by its format's reader (detected from the files). The three packed
integer layouts decode to bit-identical weights, and the `dense` file holds those weights
rounded to FP16."""),
    ("code", '''\
infos = {fmt: qb.inspect(path) for fmt, path in paths.items()}
table(["format", "detected", "size (MB)", "bits/weight (linears)", "checksums"],
      [(fmt, i["format"], f"{i['size_bytes'] / 1e6:.1f}", i["bits_per_weight_quantized"],
        "ok" if i["files_ok"] else "CHANGED") for fmt, i in infos.items()])

name = "model.layers.3.mlp.down_proj.weight"
arts = {fmt: open_artifact(paths[fmt]) for fmt in ("compressed-tensors", "gptq", "awq")}
ref = arts["compressed-tensors"].quantized(name).dequantize(torch.float32)
for fmt, art in arts.items():
    print(f"{fmt:20s} same weights as compressed-tensors:",
          torch.equal(art.quantized(name).dequantize(torch.float32), ref))
dense = open_artifact(paths["dense"]).weights.get(name)
print(f"{'dense':20s} = those weights in fp16:", torch.equal(dense, ref.half()))'''),
    ("md", """\
## Evaluate each file

Perplexity, KLD and top-1 against the FP16 baseline on 1024 tokens, all seven files in one
lock-step pass (what `qb.evaluate` does for one artifact): the baseline runs once per window and
every file, read back through its reader, is scored on the same tokens. GGUF files are
evaluated with llama.cpp's CPU arithmetic (activations rounded to Q8_K as its matmuls do)."""),
    ("code", '''\
from quantbench.eval.evaluator import evaluate
from quantbench.eval.protocol import EvalProtocol
from quantbench.eval.run import artifact_factory, eval_cache_dir, source_factory

report = evaluate(source_factory(model),
                  {fmt: artifact_factory(open_artifact(path)) for fmt, path in paths.items()},
                  model.tokenizer(), EvalProtocol(max_tokens=1024),
                  baseline_key=model.fingerprint(), cache_dir=eval_cache_dir(), progress=False)
print(report.describe(), f"· baseline ppl {report.baseline.ppl:.3f}")
table(["format", "ppl", "Δppl %", "KLD", "top-1 %"],
      [(fmt, f"{r.ppl:.3f}", f"{r.delta_ppl_pct:+.2f}", f"{r.kld_mean:.4f}",
        f"{100 * r.top1:.1f}") for fmt, r in report.results.items()])'''),
    ("md", """\
## transformers: dense, compressed-tensors, bitsandbytes

Each file loaded with `AutoModelForCausalLM.from_pretrained`, its logits compared with those
of the model quantbench's reader builds, both in float32 (transformers keeps the checkpoint's
float dtype unless told). transformers 5.x loads asymmetric `compressed-tensors` files through
the dequantizing path (`CompressedTensorsConfig(dequantize=True)`), which materialises
`scale·(code − zero)` in the fp16 scale dtype, so that row is compared with our weights
rounded to fp16 too."""),
    ("code", '''\
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

from quantbench.models.torch_model import build_causal_lm

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def quantbench_model(fmt):
    """The model quantbench's reader builds from the file (fp16-rounded weights for the
    compressed-tensors row, as transformers' dequantizing loader holds them)."""
    art = open_artifact(paths[fmt])
    if fmt != "compressed-tensors":
        return artifact_factory(art)()
    tensors = ((n, t.half()) if n in art.quantized_names else (n, t) for n, t in art.dequantized())
    return build_causal_lm(art.config, tensors, torch.float32)


ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
loaders = {
    "dense": dict(dtype=torch.float32),
    "compressed-tensors": dict(dtype=torch.float32,
                               quantization_config=CompressedTensorsConfig(dequantize=True)),
    "bitsandbytes": dict(device_map="cpu"),
}
rows = []
for fmt, kwargs in loaders.items():
    hf = AutoModelForCausalLM.from_pretrained(str(paths[fmt]), **kwargs).eval()
    for p in hf.parameters():
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    for m in hf.modules():  # bitsandbytes: its reference CPU path, not the fused bf16 kernel
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
    with torch.inference_mode():
        theirs = hf(ids).logits.float()
        ours = quantbench_model(fmt)(ids)
        ours = (ours.logits if hasattr(ours, "logits") else ours).float()
    rows.append((fmt, type(hf.model.layers[0].mlp.down_proj).__name__,
                 f"{(theirs - ours).abs().max().item():.2e}",
                 f"{theirs.abs().max().item():.1f}"))
table(["format", "transformers' layer", "max |Δlogit| vs quantbench", "max |logit|"], rows)'''),
    ("code", '''\
tok = AutoTokenizer.from_pretrained(str(paths["dense"]))
hf = AutoModelForCausalLM.from_pretrained(str(paths["dense"]), dtype=torch.float32).eval()
prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                 tokenize=False, add_generation_prompt=True)
inputs = tok(prompt, return_tensors="pt")
with torch.inference_mode():
    out = hf.generate(**inputs, max_new_tokens=24, do_sample=False)
print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))'''),
    ("md", """\
## llama.cpp: gguf

`llama-perplexity` runs `model.gguf` on the same text; with its second-half scoring
(`scoring="half"`) our evaluator scores the same positions of the same windows. llama.cpp is
built once from the `llama-cpp-python` sdist (`make llamacpp`, about 10 minutes); without it this
cell says so and moves on."""),
    ("code", '''\
from quantbench.eval.data import load_eval_text
from quantbench.eval.protocol import EvalProtocol
from quantbench.runtimes import llamacpp

tools = llamacpp.find()
if tools is None:
    print("llama.cpp is not built here: run `make llamacpp` (or "
          "`python -m quantbench.runtimes.llamacpp`) and re-run this cell")
else:
    text = OUT / "wiki.test.raw"
    text.write_text(load_eval_text().text)
    theirs = llamacpp.perplexity(tools, paths["gguf"] / "model.gguf", text, ctx=512, chunks=2)
    protocol = EvalProtocol(ctx=512, max_tokens=None, n_windows=2, scoring="half")
    ours = next(iter(qb.evaluate(paths["gguf"], protocol=protocol).results.values()))
    print(f"llama.cpp {tools.version}: ppl {theirs.ppl:.4f} over {theirs.chunks} chunks")
    print(f"quantbench:           ppl {ours.ppl:.4f} (same windows, second-half scoring)")'''),
    ("md", """\
## gptq, awq, exl2: runtimes that need a GPU

* `gptq` loads in transformers + optimum + GPTQModel, vLLM and exllamav2 — on a CUDA GPU.
  GPTQModel also has CPU kernels; the tests run our files through them in a separate venv
  (`benchmarks/peers/README.md`), not installed here.
* `awq` (AutoAWQ GEMM layout) loads in vLLM and GPTQModel on GPU, and in GPTQModel's CPU AWQ
  kernels (same separate venv).
* `exl2` loads only in exllamav2 (and TabbyAPI on top of it), whose kernels are CUDA-only.

Their numbers above come from quantbench's readers, which the tests check against those
runtimes (or, for EXL2, against a bit-by-bit reader of the format)."""),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_methods_compared.ipynb": METHODS,
    "03_formats_and_runtimes.ipynb": FORMATS,
}


def make(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A notebook with these cells, no outputs, no execution counts, fixed cell ids."""
    nb = new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                  "language": "python"},
                   "language_info": {"name": "python"}}
    for i, (kind, source) in enumerate(cells):
        cell = new_markdown_cell(source) if kind == "md" else new_code_cell(source)
        cell.id = f"cell-{i:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(cells: list[tuple[str, str]]) -> str:
    return nbformat.writes(make(cells)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only check that the notebooks are what this script writes")
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write to")
    args = parser.parse_args(argv)
    stale = []
    for name, cells in NOTEBOOKS.items():
        path, text = args.out / name, render(cells)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python notebooks/build.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
