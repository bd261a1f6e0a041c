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


def gguf_layout(model) -> dict[str, list[str]]:
    """``{GGUF name: the HF tensors it holds}`` in write order: one each, or a block's experts
    of one projection, in expert order, in their stacked ``*_exps`` tensor (placed where its
    first expert comes)."""
    from quantbench.formats.gguf_kv import gguf_tensor_name

    out: dict[str, list[str]] = {}
    for name in gguf_tensors(model):
        out.setdefault(gguf_tensor_name(model.arch, name), []).append(name)
    return out


def gguf_ne(model, names: list[str]) -> tuple[int, ...]:
    """ggml ``ne`` of the GGUF tensor holding ``names`` (row length first; a stacked expert
    tensor's expert count last)."""
    from quantbench.formats.gguf_kv import expert_part

    ne = tuple(reversed(model.weights.shape(names[0])))
    return ne + (len(names),) if expert_part(model.arch, names[0]) else ne


def plan_tensor_types(mixture: str, model, targets: list[str],
                      has_imatrix: bool = False) -> dict[str, str]:
    """``{hf_name: ggml type}`` for ``targets``, by llama-quantize's rules for ``mixture``
    applied to the whole file (the attn_v / ffn_down counters see every layer; every expert
    of a stacked tensor takes its one type)."""
    arch, cfg = model.arch, model.hparams
    layout = gguf_layout(model)
    heads = int(cfg["num_attention_heads"])
    types = tensor_types(mixture, [(g, gguf_ne(model, hf)) for g, hf in layout.items()],
                         model.num_blocks, n_head=heads,
                         n_head_kv=int(cfg.get("num_key_value_heads") or heads),
                         arch=arch.gguf_arch, has_imatrix=has_imatrix,
                         n_expert=arch.num_experts)
    gguf_of = {n: g for g, hf in layout.items() for n in hf}
    return {n: types[gguf_of[n]] for n in targets if n in gguf_of}
