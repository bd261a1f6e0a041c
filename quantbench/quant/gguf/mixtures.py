"""Per-tensor ggml types of llama.cpp's named mixtures (``llama-quantize <ftype>``).

A port of ``llama_tensor_get_type`` from ``src/llama-quant.cpp`` of the llama.cpp that
llama-cpp-python 0.3.36 vendors, for llama-family models, dense or mixture-of-experts (no IQ
types): which tensors a mixture such as Q4_K_M promotes (output, tied token_embd, attn_v,
ffn_down, attn_output; with 8 experts attn_v and attn_k to Q8_0, attn_output to Q5_K), the
tensors that are never quantized (norms, the expert router ``ffn_gate_inp``), and the fallback
for rows that are not a multiple of the block size. Stacked expert tensors (``ffn_*_exps``, 3-D)
are matched by substring as llama.cpp matches them (``ffn_down_exps`` is an ffn_down, its layer
read from its name). Input is the tensor list of the F16 GGUF that llama.cpp's converter writes
(GGUF names, ``ne`` shapes with ``ne[0]`` the row length); output is the ggml type name of every
tensor, exactly as ``llama-quantize`` would pick it.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from quantbench.errors import ConfigError
from quantbench.lazy import gguf

log = logging.getLogger(__name__)

# llama_ftype ids (include/llama.h), written as general.file_type
FILE_TYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
    "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
    "Q5_K_M": 17, "Q6_K": 18, "BF16": 32,
}
# llama_ftype_get_default_type: the type a mixture starts every quantizable tensor from
DEFAULT_TYPES: dict[str, str] = {
    "F32": "F32", "F16": "F16", "BF16": "BF16", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0",
    "Q5_1": "Q5_1", "Q8_0": "Q8_0", "Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K",
    "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K",
    "Q6_K": "Q6_K",
}
# tensor_type_fallback: a 256-block type whose row length does not fit → a 32-block type
FALLBACK: dict[str, str] = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1",
                            "Q6_K": "Q8_0"}
FLOAT_TYPES = ("F32", "F16", "BF16")


def file_type(ftype: str) -> int:
    """The ``general.file_type`` id of a mixture name (``"Q4_K_M"`` → 15)."""
    return FILE_TYPES[_check_ftype(ftype)]


def block_size(type_name: str) -> int:
    """Elements per block of a ggml type (256 for k-quants, 32 for Q4_0..Q8_0, 1 for floats)."""
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layer pick for the extra bits: the first and last eighth, and every third."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def allows_quantization(name: str, ne: Sequence[int]) -> bool:
    """``tensor_allows_quantization`` for llama-family names: 2-D and 3-D (stacked experts)
    ``*weight`` tensors that are neither norms nor the expert router; the rest keep the type
    the converter gave them (F32)."""
    return (len(ne) >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def category(name: str) -> str:
    """``tensor_get_category``: output / token_embd / attn_v (incl. fused qkv, kv_b) / attn_k /
    attn_q / attn_output / ffn_up / ffn_gate / ffn_down / other, by substring like llama.cpp."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"),
                      ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                      ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                      ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if part in name:
            return cat
    return "other"


def fallback(type_name: str, ncols: int) -> str:
    """``tensor_type_fallback``: the type used when ``ncols`` is not a multiple of the block."""
    if ncols % block_size(type_name) == 0:
        return type_name
    new = FALLBACK.get(type_name, type_name)
    if block_size(new) > 32:
        raise ConfigError(f"llama.cpp defines no fallback for {type_name}")
    return new if ncols % block_size(new) == 0 else "F16"


@dataclass
class _State:
    """The counters of llama.cpp's ``quantize_state_impl`` for one pass over the tensors."""
    ftype: str
    n_layers: int
    n_gqa: int
    is_70b: bool
    has_imatrix: bool
    tied: bool
    n_expert: int = 0
    n_attention_wv: int = 0
    counters: dict[str, int] = field(default_factory=lambda: {"attn_v": 0, "ffn_down": 0})


def _output_type(new: str, ncols: int) -> str:
    """output.weight (and a tied token_embd): Q6_K unless the mixture is Q8_0, Q8_0 when the
    row does not fit the mixture's block."""
    if ncols % block_size(new) != 0:
        return "Q8_0"
    return new if new == "Q8_0" else "Q6_K"


def _attn_v_type(st: _State, new: str) -> str:
    f, i = st.ftype, st.counters["attn_v"]
    if f == "Q2_K":
        new = "Q4_K" if st.n_gqa >= 4 else "Q3_K"
    elif f == "Q3_K_M":
        new = "Q5_K" if i < 2 else "Q4_K"
    elif f == "Q3_K_L":
        new = "Q5_K"
    elif f in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, st.n_attention_wv):
        new = "Q6_K"
    elif f == "Q4_K_S" and i < 4:
        new = "Q5_K"
    if st.is_70b and new in ("Q3_K", "Q4_K"):
        new = "Q5_K"  # 8 heads share attn_v, so it is 8x smaller than attn_q: more bits are cheap
    if st.n_expert == 8:
        new = "Q8_0"  # "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
    st.counters["attn_v"] += 1
    return new


def _ffn_down_type(st: _State, new: str, name: str) -> str:
    """``i`` counts the ffn_down tensors seen; with experts llama.cpp reads the layer from the
    name instead (``layer_info``)."""
    f, i, n = st.ftype, st.counters["ffn_down"], st.n_layers
    if st.n_expert > 1:
        i = _layer_of(name, n)
    if f == "Q2_K":
        new = "Q3_K"
    elif f == "Q3_K_M":
        new = "Q5_K" if i < n // 16 else "Q4_K"
    elif f == "Q3_K_L":
        new = "Q5_K"
    elif f == "Q4_K_M":
        new = "Q6_K" if use_more_bits(i, n) else new
    elif f == "Q5_K_M" and use_more_bits(i, n):
        new = "Q6_K"
    elif f == "Q4_K_S" and i < n // 8:
        new = "Q5_K"
    elif f in ("Q4_0", "Q5_0") and st.has_imatrix and i < n // 8:
        new = "Q4_1" if f == "Q4_0" else "Q5_1"
    st.counters["ffn_down"] += 1
    return new


def _layer_of(name: str, n_layers: int) -> int:
    parts = name.split(".")
    if parts[0] != "blk" or len(parts) < 2 or not parts[1].isdigit() or \
            int(parts[1]) >= n_layers:
        raise ConfigError(f"cannot read the layer (of {n_layers}) of tensor {name}")
    return int(parts[1])


# with 8 experts, the mixtures whose attn_output becomes Q5_K (the others keep their type)
_ATTN_OUTPUT_8_EXPERTS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M")


def _attn_output_type(st: _State, new: str) -> str:
    if st.n_expert == 8:
        return "Q5_K" if st.ftype in _ATTN_OUTPUT_8_EXPERTS else new
    return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(st.ftype, new)


def _mixture_type(st: _State, name: str, ncols: int, new: str) -> str:
    """``llama_tensor_get_type_impl`` for the k-quant and legacy mixtures (the Falcon branches
    never apply; attn_q, ffn_gate/ffn_up and an untied token_embd only change in IQ mixtures,
    attn_k only with 8 experts)."""
    cat = category(name)
    if cat == "output" or (st.tied and cat == "token_embd"):
        return _output_type(new, ncols)
    if cat == "attn_v":
        return _attn_v_type(st, new)
    if cat == "attn_k" and st.n_expert == 8:
        return "Q8_0"
    if cat == "ffn_down":
        return _ffn_down_type(st, new, name)
    if cat == "attn_output":
        return _attn_output_type(st, new)
    return new


def _check_ftype(ftype: str) -> str:
    name = ftype.upper()
    if name not in FILE_TYPES:
        raise ConfigError(f"unknown GGUF mixture {ftype!r}; supported: {', '.join(FILE_TYPES)}")
    return name


def is_70b(arch: str, n_layers: int, n_head: int, n_head_kv: int, n_expert: int = 0) -> bool:
    """llama.cpp's LLM_TYPE_70B test, the only model size its mixtures look at (a llama with 8
    experts is typed by its expert layout instead: never 70B)."""
    if arch == "llama":
        return n_layers == 80 and n_head != n_head_kv and n_expert != 8
    return arch == "qwen2" and n_layers == 80


def tensor_types(ftype: str, tensors: Sequence[tuple[str, Sequence[int]]], n_layers: int, *,
                 n_head: int, n_head_kv: int, arch: str = "llama",
                 has_imatrix: bool = False, n_expert: int = 0) -> dict[str, str]:
    """``{gguf_name: ggml type name}`` that ``llama-quantize <ftype>`` gives each tensor of an
    F16 GGUF holding ``tensors`` (``(gguf_name, ne)`` with ``ne[0]`` the row length) of a model
    with ``n_expert`` experts per block (``<arch>.expert_count``; 0 for a dense model).

    Tensors are visited in llama.cpp's order (non-block tensors first, then by layer, names
    sorted within each group), which the attn_v/ffn_down counters depend on. ``has_imatrix``
    only matters for Q4_0/Q5_0 (their first ffn_down layers become Q4_1/Q5_1).
    """
    ftype = _check_ftype(ftype)
    default = DEFAULT_TYPES[ftype]
    names = {n for n, _ in tensors}
    st = _State(ftype=ftype, n_layers=n_layers, n_gqa=n_head // max(1, n_head_kv),
                is_70b=is_70b(arch, n_layers, n_head, n_head_kv, n_expert),
                has_imatrix=has_imatrix, tied="output.weight" not in names, n_expert=n_expert,
                n_attention_wv=sum(category(n) == "attn_v" for n in names))
    out: dict[str, str] = {}
    for name, ne in sorted(tensors, key=lambda t: _order_key(t[0])):
        if not allows_quantization(name, ne):
            out[name] = "F32"
        elif default in FLOAT_TYPES:
            out[name] = default
        else:
            new = _mixture_type(st, name, int(ne[0]), default)
            out[name] = fallback(new, int(ne[0]))
    return out


def _order_key(name: str) -> tuple[int, str]:
    """``weight_name_comparer``: layer number (-1 outside blocks), then the name."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1]), name
    return -1, name
