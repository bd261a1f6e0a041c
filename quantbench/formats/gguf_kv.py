"""GGUF key/values and the few helpers every ``formats/gguf_*`` module shares: the :class:`KV`
record, the HF → GGUF architecture name, reading a JSON side file, and the HF ↔ GGUF tensor
names (of a mixture-of-experts block too: llama.cpp stacks each projection of a block's experts
into one 3-D ``blk.N.ffn_*_exps`` tensor, expert-major, and names the router
``blk.N.ffn_gate_inp``). A leaf below :mod:`quantbench.formats.gguf_meta` (metadata),
:mod:`quantbench.formats.gguf_vocab` and :mod:`quantbench.formats.gguf_special` (tokenizer
keys), which all import it; the writer, the reader and the GGUF import name tensors here.
Also the converter's expert keys and gguf-py's parameter count of a mixture-of-experts model
(``general.size_label`` "8x7.2B").
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from quantbench.errors import ConfigError
from quantbench.formats.gguf_key import KV  # (its home is a leaf: see gguf_key.py)
from quantbench.models.arch import ARCHITECTURES, ArchSpec, arch_of

ARCHS = {t: spec.gguf_arch for spec in ARCHITECTURES for t in spec.model_types}  # HF → GGUF arch


def kv_dict(kvs: Sequence[KV]) -> dict[str, Any]:
    """``{key: value}``; a later entry for the same key replaces an earlier one (as in gguf-py)."""
    return {kv.key: kv.value for kv in kvs}


def gguf_arch(config: dict) -> str:
    """The GGUF architecture name of an HF config; ConfigError for the unsupported ones."""
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise ConfigError(f"GGUF export does not support model_type {model_type!r}; "
                          f"supported: {', '.join(ARCHS)}")
    return ARCHS[model_type]


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def expert_part(spec: ArchSpec, hf_name: str) -> tuple[str, int] | None:
    """``(stacked GGUF name, expert)`` of one expert's tensor in a mixture-of-experts block
    (``model.layers.3.mlp.experts.5.down_proj.weight`` → ``("blk.3.ffn_down_exps.weight",
    5)``); None for every other tensor."""
    index = spec.block_of(hf_name)
    if spec.experts is None or index is None:
        return None
    base, _, suffix = hf_name.rpartition(".")
    parsed = spec.experts.parse(base[len(f"{spec.block_prefix}.{index}."):])
    gguf = dict(spec.experts.projections).get(parsed[1]) if parsed else None
    return None if gguf is None else (f"blk.{index}.{gguf}.{suffix}", parsed[0])


def gguf_tensor_name(spec: ArchSpec, hf_name: str) -> str:
    """HF tensor name → llama.cpp's (``ArchSpec.gguf_tensor_name``; an expert's tensor → its
    stacked tensor, the router → ``blk.N.ffn_gate_inp``). ModelLoadError for a tensor llama.cpp
    has no name for."""
    part = expert_part(spec, hf_name)
    if part is not None:
        return part[0]
    index = spec.block_of(hf_name)
    base, _, suffix = hf_name.rpartition(".")
    if spec.experts is not None and index is not None and \
            base == spec.block_module(index, spec.experts.router):
        return f"blk.{index}.{spec.experts.router_gguf}.{suffix}"
    return spec.gguf_tensor_name(hf_name)


def hf_tensor_names(spec: ArchSpec, gguf_name: str, experts: int | None = None) -> list[str]:
    """The HF tensors a GGUF tensor holds: one, or each expert's of a stacked ``*_exps``
    tensor in expert order (``experts`` of them; default the count ``spec`` is expanded to,
    ``arch_of``). ModelLoadError for a name the family does not have."""
    parts = gguf_name.split(".")
    if spec.experts is not None and len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit():
        index, name, suffix = int(parts[1]), parts[2], parts[3]
        if name == spec.experts.router_gguf:
            return [f"{spec.block_module(index, spec.experts.router)}.{suffix}"]
        projection = {g: h for h, g in spec.experts.projections}.get(name)
        if projection is not None:
            count = spec.num_experts if experts is None else experts
            return [f"{spec.block_module(index, spec.experts.linear(e, projection))}.{suffix}"
                    for e in range(count)]
    return [spec.hf_tensor_name(gguf_name)]


# ---------------------------------------------------------------- mixture-of-experts keys

# ``<arch>.*`` expert keys TextModel writes for any config holding one of the HF keys
_EXPERT_KEYS = (("expert_count", ("num_local_experts", "num_experts", "n_routed_experts")),
                ("expert_used_count", ("num_experts_per_tok", "num_experts_per_token",
                                       "top_k_experts")))


def expert_count_kvs(config: dict) -> list[KV]:
    """``<arch>.expert_count`` / ``expert_used_count`` (the converter's TextModel writes them
    after the RMS epsilon for a config holding one of its keys; none for a dense model)."""
    from gguf import GGUFValueType as VT

    out = []
    for key, hf_keys in _EXPERT_KEYS:
        value = next((config[k] for k in hf_keys if config.get(k) is not None), None)
        if value is not None:
            out.append(KV(f"{gguf_arch(config)}.{key}", int(value), VT.UINT32))
    return out


def expert_size_kvs(config: dict) -> list[KV]:
    """``<arch>.expert_feed_forward_length``, which the converter's MoE classes (Qwen2MoeModel,
    qwen3moe's) add after ``general.file_type`` for experts narrower than
    ``intermediate_size`` (the family's ``Experts.size_key``); Mixtral's experts are
    ``intermediate_size`` wide, ``feed_forward_length`` says it."""
    from gguf import GGUFValueType as VT

    experts = arch_of(config).experts
    if experts is None or experts.size_key == "intermediate_size":
        return []
    return [KV(f"{gguf_arch(config)}.expert_feed_forward_length",
               int(config[experts.size_key]), VT.UINT32)]


def parameter_counts(tensors: Iterable[tuple[str, Sequence[int]]]) -> tuple[int, int, int, int]:
    """gguf-py's ``get_total_parameter_count`` over ``(gguf_name, ne)``: (total, shared,
    one expert's, expert count); a stacked ``*_exps.`` tensor's last ``ne`` counts experts."""
    total = shared = expert = expert_sum = n_stacked = 0
    for name, ne in tensors:
        size = math.prod(ne)
        total += size
        if "_exps." in name and len(ne) >= 3:
            count = ne[1 if ".bias" in name else 2]  # gguf-py's shape[-2] / shape[-3]
            expert, expert_sum, n_stacked = expert + size // count, expert_sum + count, \
                n_stacked + 1
        else:
            shared += size
    return total, shared, expert, expert_sum // n_stacked if n_stacked else 0
