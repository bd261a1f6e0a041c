"""A small mixture-of-experts model with real weights, for MoE benchmarks: SmolLM2-135M
"upcycled" into a Mixtral (each dense MLP copied into every expert, each copy perturbed, a
random router), written as an HF checkpoint.

    python benchmarks/upcycled_moe.py OUT_DIR [--experts 4] [--top-k 2] [--noise 0.1]

No MoE checkpoint installs from the package registries this machine reaches, and a random tiny
MoE says nothing about quality; this one predicts text nearly as well as SmolLM2 (WikiText-2,
4k tokens: perplexity 34.2 against SmolLM2's 30.4 at the default noise 0.1) while its experts
differ, so the router's choices matter, and its weights are off SmolLM2's Q4_1 grid. Expert ``e`` of a layer is ``W + noise·σ(W)·N(0, 1)`` for each of
gate/up/down (seeded per expert); the router is ``N(0, 1/√hidden)``.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file


def build(out: Path, experts: int = 4, top_k: int = 2, noise: float = 0.1) -> Path:
    from quantbench.models.loader import load_model

    src = load_model("sample:smollm2")
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in src.config.items() if k not in ("architectures", "model_type")}
    config.update(architectures=["MixtralForCausalLM"], model_type="mixtral",
                  num_local_experts=experts, num_experts_per_tok=top_k,
                  router_jitter_noise=0.0, sliding_window=None, output_router_logits=False)
    for key in ("mlp_bias", "attention_bias", "pretraining_tp"):
        config.pop(key, None)
    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    hidden = int(config["hidden_size"])
    for name in src.weights.names():
        t = src.weights.get(name)
        parts = name.split(".")
        if ".mlp." not in name:
            tensors[name] = t.contiguous()
            continue
        layer, proj = int(parts[2]), parts[4]  # model.layers.N.mlp.<proj>.weight
        w = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[proj]
        sigma = float(t.float().std())
        for e in range(experts):
            noisy = t.float() + noise * sigma * torch.randn(t.shape, generator=g)
            tensors[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"] = \
                noisy.to(t.dtype).contiguous()
        if proj == "gate_proj":
            tensors[f"model.layers.{layer}.block_sparse_moe.gate.weight"] = (
                torch.randn(experts, hidden, generator=g) / hidden ** 0.5).to(t.dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for aux in src.aux_files():
        shutil.copy2(aux, out / aux.name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--noise", type=float, default=0.1)
    args = ap.parse_args()
    print(build(args.out, args.experts, args.top_k, args.noise))


if __name__ == "__main__":
    main()
