"""Where a quantized GGUF's KLD comes from: each group of linears alone.

    python benchmarks/bench_kld_attribution.py A.gguf [B.gguf ...] [--labels a,b] [--windows 8]

For every file: the source model in float32 with *only* one group of tensors (token
embeddings, q, k, v, o, gate, up, down over all blocks) replaced by the file's dequantized
tensors, scored by KLD against the float model on the same WikiText-2 windows (ctx 512,
second-half scoring), plus all groups together. On the sample the groups add up to within a few
per cent of the whole, so the table says which tensors a method should spend its effort on.
Writes JSON and prints a table.
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from quantbench.eval.data import load_eval_text, make_windows, tokenize_for_eval
from quantbench.eval.report import write_json
from quantbench.models.gguf_import import hf_config_from_gguf, read_gguf_tensors
from quantbench.models.loader import load_model

GROUPS = {"embed": r"embed_tokens", "q": r"q_proj", "k": r"k_proj", "v": r"v_proj",
          "o": r"o_proj", "gate": r"gate_proj", "up": r"up_proj", "down": r"down_proj",
          "all": r"."}
CTX = 512


def main() -> None:
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--labels", default=None, help="comma-separated, one per file")
    ap.add_argument("--source", default="sample:smollm2")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/kld_attribution_smollm2.json")
    args = ap.parse_args()
    labels = args.labels.split(",") if args.labels else [Path(f).parent.name for f in args.files]
    start = time.perf_counter()
    source = load_model(args.source)
    ids = tokenize_for_eval(source.tokenizer(), load_eval_text().text, CTX * args.windows)
    windows = make_windows(ids, CTX)[: args.windows]
    model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32).eval()
    state = model.state_dict()
    original = {k: v.clone() for k, v in state.items()}

    def logprobs() -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([model(windows[i:i + 4]).logits[:, CTX // 2:].log_softmax(-1)
                              for i in range(0, len(windows), 4)])

    base = logprobs()
    rows = []
    for path, label in zip(args.files, labels):
        reader = GGUFReader(path)
        quantized = {n: w for n, w, _ in read_gguf_tensors(reader, hf_config_from_gguf(reader))
                     if n in state}
        row = {"file": label}
        for group, pattern in GROUPS.items():
            for k in state:
                state[k].copy_(original[k])
            for n, w in quantized.items():
                if re.search(pattern, n):
                    state[n].copy_(w.reshape(state[n].shape))
            lp = logprobs()
            row[group] = round(float((base.exp() * (base - lp)).sum(-1).mean()), 6)
        rows.append(row)
        print(row, flush=True)
    table = Table(title=f"KLD of each tensor group alone ({args.source}, {len(windows)} × {CTX})")
    table.add_column("file")
    for group in GROUPS:
        table.add_column(group, justify="right")
    for row in rows:
        table.add_row(row["file"], *(f"{row[g]:.5f}" for g in GROUPS))
    Console(width=150).print(table)
    write_json(Path(args.out), {
        "benchmark": "kld_attribution", "source": args.source,
        "protocol": {"ctx": CTX, "windows": len(windows), "scoring": "second half",
                     "data": "WikiText-2 test"},
        "rows": rows, "seconds": round(time.perf_counter() - start, 1)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
