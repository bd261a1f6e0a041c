"""Peak memory of GPTQ on a model larger than 8 GiB: proof that the pipeline streams.

    python benchmarks/bench_memory.py [--blocks 400] [--hidden 1024] [--keep]

Builds a synthetic llama checkpoint on disk (random fp16 weights, written one decoder block at a
time, never whole in memory; the tokenizer is the sample model's), then runs
``quantbench convert --method gptq --format gptq`` on it in a child process and records its wall
time and peak RSS (``wait4``) next to the checkpoint's size. Writes JSON and prints a table.
The default shape (hidden 1024, 400 blocks) has 4.6 B parameters, 8.6 GiB of fp16 weights:
narrow on purpose, so the GPTQ solves (cost ∝ parameters × width) finish on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from _measure import run_measured
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file


def build_checkpoint(out: Path, blocks: int, hidden: int, inter: int, heads: int,
                     kv_heads: int, tokenizer_from: Path, seed: int = 0) -> int:
    """Write config, tokenizer and ``blocks`` decoder blocks as one shard per block."""
    from quantbench.models.arch import LLAMA_LINEARS

    out.mkdir(parents=True, exist_ok=True)
    tok_cfg = json.loads((tokenizer_from / "config.json").read_text())
    vocab = tok_cfg["vocab_size"]
    head_dim = hidden // heads
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": blocks,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float16",
              "bos_token_id": tok_cfg.get("bos_token_id"), "eos_token_id": tok_cfg.get("eos_token_id"),
              "hidden_act": "silu"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / name).is_file():
            shutil.copy2(tokenizer_from / name, out / name)
    gen = torch.Generator().manual_seed(seed)
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
              "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}
    assert set(shapes) == set(LLAMA_LINEARS)
    n_files = blocks + 1
    weight_map, total, params = {}, 0, 0

    def shard(i: int) -> str:
        return f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"

    def emit(i: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total, params
        save_file(tensors, str(out / shard(i)), {"format": "pt"})
        weight_map.update({k: shard(i) for k in tensors})
        total += (out / shard(i)).stat().st_size
        params += sum(t.numel() for t in tensors.values())

    emit(0, {"model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=gen) * 0.02).half(),
             "lm_head.weight": (torch.randn(vocab, hidden, generator=gen) * 0.02).half(),
             "model.norm.weight": torch.ones(hidden, dtype=torch.float16)})
    for b in range(blocks):
        p = f"model.layers.{b}."
        tensors = {f"{p}{lin}.weight": (torch.randn(*shape, generator=gen)
                                         / shape[1] ** 0.5).half()
                   for lin, shape in shapes.items()}
        tensors[f"{p}input_layernorm.weight"] = torch.ones(hidden, dtype=torch.float16)
        tensors[f"{p}post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.float16)
        emit(b + 1, tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=400)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--calib-samples", type=int, default=2)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--workdir", default=None, help="where the synthetic checkpoint goes")
    ap.add_argument("--keep", action="store_true",
                    help="keep (and, with --workdir, reuse) the synthetic checkpoint")
    ap.add_argument("--out", default="benchmarks/results/memory_gptq.json")
    args = ap.parse_args()
    from quantbench.models.loader import load_model

    console = Console()
    sample = load_model("sample:smollm2")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="qb-membench-"))
    src, dst = root / "synthetic-llama", root / "synthetic-gptq"
    try:
        start = time.perf_counter()
        if args.keep and (src / "model.safetensors.index.json").is_file():  # reuse a kept one
            weights = load_model(str(src)).weights
            params = sum(int(torch.tensor(weights.shape(n)).prod()) for n in weights.names())
        else:
            params = build_checkpoint(src, args.blocks, args.hidden, args.inter, args.heads,
                                      args.kv_heads, Path(sample.path))
        build_s = time.perf_counter() - start
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        console.print(f"built {params / 1e9:.2f} B parameters, {size / 2**30:.2f} GiB "
                      f"in {build_s:.0f} s")
        cmd = [sys.executable, "-m", "quantbench.cli", "convert", str(src), "--method", "gptq",
               "--bits", "4", "--group-size", "128", "--zero-point", "--static-groups",
               "--calib-samples", str(args.calib_samples), "--calib-len", str(args.calib_len),
               "--format", "gptq", "-o", str(dst), "--overwrite"]
        run = run_measured(cmd)
        out_size = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    payload = {"benchmark": "memory_gptq", "parameters": params, "checkpoint_bytes": size,
               "output_bytes": out_size, "shape": vars(args), "command": cmd[3:], **run,
               "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))
    table = Table(title="GPTQ w4 g128 on a synthetic llama larger than 8 GiB")
    for col in ("parameters", "fp16 checkpoint", "gptq output", "wall", "peak RSS"):
        table.add_column(col, justify="right")
    table.add_row(f"{params / 1e9:.2f} B", f"{size / 2**30:.2f} GiB", f"{out_size / 2**30:.2f} GiB",
                  f"{run['seconds'] / 60:.1f} min", f"{run['peak_rss_mb'] / 1024:.2f} GiB")
    console.print(table)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
