"""A mixture-of-experts block with many experts: time and peak memory of calibrated
quantization, and how the per-expert loop scales with the expert count.

    python benchmarks/bench_moe.py [--experts 16,64] [--hidden 2048] [--expert-size 768]
        [--layers 1] [--methods rtn,gptq] [--calib-samples 16] [--calib-len 256]

Builds synthetic Qwen3-MoE checkpoints on disk (random fp16 weights; Qwen3-30B-A3B's expert
shape by default: hidden 2048, experts of 768, top-8), then runs ``quantbench convert`` on each
in a child process (``--format gptq``) and records wall time, peak RSS (``wait4``) and the
calibration coverage the manifest reports (min / median tokens per expert, experts that fell
back to force-routing). Writes benchmarks/results/moe_scaling.json and prints a table.
Per-expert cost should grow linearly with the expert count at fixed top-k and tokens, and
peak memory by one block's weights plus the routed activations.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from _measure import run_measured
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file


def build(out: Path, experts: int, hidden: int, size: int, layers: int, top_k: int,
          tokenizer_from: Path) -> float:
    """Write a Qwen3-MoE checkpoint (one shard per layer); returns its size in GB."""
    out.mkdir(parents=True, exist_ok=True)
    tok = json.loads((tokenizer_from / "config.json").read_text())
    heads, kv, head_dim = 16, 4, 128
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
              "hidden_size": hidden, "intermediate_size": 4 * hidden,
              "moe_intermediate_size": size, "num_experts": experts,
              "num_experts_per_tok": top_k, "norm_topk_prob": True, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
              "vocab_size": tok["vocab_size"], "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False,
              "torch_dtype": "float16", "bos_token_id": tok.get("bos_token_id"),
              "eos_token_id": tok.get("eos_token_id"), "hidden_act": "silu",
              "decoder_sparse_step": 1, "mlp_only_layers": []}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / name).is_file():
            shutil.copy2(tokenizer_from / name, out / name)
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(torch.float16)

    weight_map, total = {}, 0
    top = {"model.embed_tokens.weight": rand(tok["vocab_size"], hidden),
           "model.norm.weight": torch.ones(hidden, dtype=torch.float16),
           "lm_head.weight": rand(tok["vocab_size"], hidden)}
    shards = [("model-top.safetensors", top)]
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
             p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
             p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
             p + "self_attn.k_proj.weight": rand(kv * head_dim, hidden),
             p + "self_attn.v_proj.weight": rand(kv * head_dim, hidden),
             p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
             p + "self_attn.q_norm.weight": torch.ones(head_dim, dtype=torch.float16),
             p + "self_attn.k_norm.weight": torch.ones(head_dim, dtype=torch.float16),
             p + "mlp.gate.weight": rand(experts, hidden, std=0.1)}
        for e in range(experts):
            for name, shape in (("gate_proj", (size, hidden)), ("up_proj", (size, hidden)),
                                ("down_proj", (hidden, size))):
                t[f"{p}mlp.experts.{e}.{name}.weight"] = rand(*shape)
        shards.append((f"model-{i:03d}.safetensors", t))
    for fname, tensors in shards:
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        total += (out / fname).stat().st_size
        weight_map.update({n: fname for n in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", default="16,64")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--expert-size", type=int, default=768)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--calib-samples", default="16")
    ap.add_argument("--calib-len", default="256")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_scaling.json"))
    args = ap.parse_args()
    from quantbench.models.sample import resolve_sample

    tokenizer_from = resolve_sample("sample:smollm2")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as tmp:
        for n in (int(x) for x in args.experts.split(",")):
            ckpt = Path(tmp) / f"moe-{n}"
            gb = build(ckpt, n, args.hidden, args.expert_size, args.layers, args.top_k,
                       tokenizer_from)
            for method in args.methods.split(","):
                out = Path(tmp) / f"out-{n}-{method}"
                opts = ["--method", "zeropoint" if method == "rtn" else method]
                if method != "rtn":
                    opts += ["--calib-samples", args.calib_samples, "--calib-len", args.calib_len]
                m = run_measured([sys.executable, "-m", "quantbench.cli", "convert", str(ckpt),
                                  *opts, "--bits", "4", "--group-size", "128", "--format",
                                  "gptq", "-o", str(out)])
                manifest = json.loads((out / "quantbench.json").read_text())
                cov = manifest.get("experts") or {}
                layers = cov.get("layers") or [{}]
                rows.append({"experts": n, "method": method, "checkpoint_gb": round(gb, 3),
                             "expert_params_per_layer": 3 * n * args.hidden * args.expert_size,
                             **m, "seconds_per_expert": round(m["seconds"] / n / args.layers, 3),
                             "min_tokens": layers[0].get("min_tokens"),
                             "median_tokens": layers[0].get("median_tokens"),
                             "force_routed": sum(len(x.get("force_routed", [])) for x in layers)})
                shutil.rmtree(out)
            shutil.rmtree(ckpt)
    result = {"shape": {"hidden": args.hidden, "expert_size": args.expert_size,
                        "top_k": args.top_k, "layers": args.layers},
              "calibration": {"samples": int(args.calib_samples), "len": int(args.calib_len)},
              "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    table = Table(title=f"MoE block: hidden {args.hidden}, experts of {args.expert_size}, "
                        f"top-{args.top_k}, {args.layers} layer(s)")
    for col in ("experts", "method", "ckpt GB", "s", "s / expert", "peak RSS MB",
                "tokens min/med", "force-routed"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["experts"]), r["method"], f"{r['checkpoint_gb']:.2f}",
                      f"{r['seconds']:.1f}", f"{r['seconds_per_expert']:.2f}",
                      f"{r['peak_rss_mb']:.0f}", f"{r['min_tokens']}/{r['median_tokens']}",
                      str(r["force_routed"]))
    Console().print(table)


if __name__ == "__main__":
    main()
