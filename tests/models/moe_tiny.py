"""Tiny random mixture-of-experts models from transformers' own config classes (Mixtral,
Qwen3-MoE), shared by the MoE tests: top-k 2, 4 / 8 experts, one router row pushed down so
that expert 0 of layer 0 gets no token (the fallback path), saved in the per-expert layout
transformers writes (``fused=True``: transformers 5's fused 3-D parameters instead)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.formats.test_gguf_meta import _qwen_tokenizer

COMMON = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None,
              eos_token_id=2, pad_token_id=0, initializer_range=0.1, num_experts_per_tok=2)
IDS = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))


def hf_model(kind: str, starve: bool = True):
    """A float32 transformers model of ``kind`` (mixtral, qwen3_moe), seeded."""
    from transformers import (MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    torch.manual_seed(0)
    if kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=96, num_local_experts=6,
                                                 **COMMON))
    elif kind == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=128,
                                                   moe_intermediate_size=64, num_experts=8,
                                                   head_dim=32, norm_topk_prob=True, **COMMON))
    else:
        raise ValueError(kind)
    if starve:
        starve_expert_zero(model.model.layers[0].mlp.gate.weight)
    return model.eval()


def starve_expert_zero(router: torch.Tensor) -> None:
    """Rows 1-4 of the router become ``r0 ± v``, ``r0 ± u``: of each pair exactly one scores
    above expert 0 for any input (not orthogonal to v, u), so two experts always beat it and
    it never makes a top-2."""
    with torch.no_grad():
        base, v, u = router[0].clone(), router[1].clone(), router[2].clone()
        router[1], router[2] = base + v, base - v
        router[3], router[4] = base + u, base - u


def make_tiny_moe(kind: str, directory: Path, fused: bool = False, starve: bool = True
                  ) -> Path:
    """Save :func:`hf_model` in fp16 with a Qwen BPE tokenizer; ``fused``: the weights as
    transformers 5 holds them (``mlp.experts.gate_up_proj`` / ``down_proj``)."""
    model = hf_model(kind, starve).to(torch.float16)
    model.save_pretrained(str(directory))
    if fused:
        for f in directory.glob("*.safetensors"):
            f.unlink()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    _qwen_tokenizer(directory)
    return directory


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
