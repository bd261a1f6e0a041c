"""A llama.cpp mixture (``Q4_K_M``) resolved to one ggml type per tensor of a model."""
from __future__ import annotations

from quantbench.quant.gguf.mixtures import tensor_types


def gguf_tensors(model) -> list[str]:
    """HF names of the tensors a GGUF of ``model`` holds, in write order (lm_head omitted
    when tied: llama.cpp reads token_embd for both)."""
    arch = model.arch
    names = [n for n in model.other_tensor_names()  # no vision tower: llama.cpp's mmproj
             if not (model.tied_embeddings and n == f"{arch.lm_head}.weight")
             and arch.passthrough_part(n) is None]
    for index in range(model.num_blocks):
        names += model.block_tensor_names(index)
    return names


def plan_tensor_types(mixture: str, model, targets: list[str],
                      has_imatrix: bool = False) -> dict[str, str]:
    """``{hf_name: ggml type}`` for ``targets``, by llama-quantize's rules for ``mixture``
    applied to the whole file (the attn_v / ffn_down counters see every layer)."""
    arch, cfg = model.arch, model.hparams
    names = gguf_tensors(model)
    gguf_names = {n: arch.gguf_tensor_name(n) for n in names}
    ne = [(gguf_names[n], tuple(reversed(model.weights.shape(n)))) for n in names]
    heads = int(cfg["num_attention_heads"])
    types = tensor_types(mixture, ne, model.num_blocks, n_head=heads,
                         n_head_kv=int(cfg.get("num_key_value_heads") or heads),
                         arch=arch.gguf_arch, has_imatrix=has_imatrix)
    return {n: types[gguf_names[n]] for n in targets if n in gguf_names}
