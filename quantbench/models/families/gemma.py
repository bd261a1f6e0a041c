"""Gemma 2 and Gemma 3 (text): ``model_type`` ``gemma2`` / ``gemma3_text``, llama.cpp archs
``gemma2`` / ``gemma3``.

What sets them apart from llama, as data: every RMSNorm scales by ``1 + w`` (``norm_offset``;
llama.cpp's converter stores ``1 + w`` for every ``*norm.weight``), both residual branches are
normed on their output too (``post_attention_layernorm``, ``post_feedforward_layernorm``: post
norms; the MLP reads ``pre_feedforward_layernorm``), Gemma 3 norms q and k per head
(``self_attn.q_norm``/``k_norm``, also ``1 + w``), embeddings are tied by default. The
embedding scale √hidden, GeGLU, soft-capping and the per-layer sliding/global masks and RoPE
bases live in transformers' forward, which the calibration layer runs.

llama.cpp's attention scale is ``1/√head_dim`` (``1/√(hidden/heads)`` for the 27B layouts) and
ignores ``query_pre_attn_scalar``; real Gemma checkpoints agree with that rule, and GGUF import
sets ``query_pre_attn_scalar`` by it.
"""
from __future__ import annotations

from dataclasses import replace

from quantbench.errors import ConfigError
from quantbench.models.archspec import (
    LLAMA_GGUF_LINEARS,
    LLAMA_HYPERPARAMETERS,
    LLAMA_LINEARS,
    LLAMA_SHAPES,
    ArchSpec,
    Sublayer,
)

GEMMA2_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")
QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")

GEMMA_SUBLAYERS = (
    Sublayer("input_layernorm", "self_attn",
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj",
             takes_layer_kwargs=True, values="self_attn.v_proj",
             post_norm="post_attention_layernorm"),
    Sublayer("pre_feedforward_layernorm", "mlp", ("mlp.gate_proj", "mlp.up_proj"),
             "mlp.down_proj", post_norm="post_feedforward_layernorm"),
)

# AWQ folds into the norm that feeds a branch, never into a post norm (it scales the output)
GEMMA_SCALE_FOLDING = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)

GEMMA2_SHAPES = LLAMA_SHAPES + (
    ("pre_feedforward_layernorm", ("hidden_size",)),
    ("post_feedforward_layernorm", ("hidden_size",)),
)
GEMMA3_SHAPES = GEMMA2_SHAPES + (
    ("self_attn.q_norm", ("head_dim",)),
    ("self_attn.k_norm", ("head_dim",)),
)

GEMMA_HYPERPARAMETERS = LLAMA_HYPERPARAMETERS + (
    ("attn_logit_softcapping", "positive"),
    ("final_logit_softcapping", "positive"),
    ("query_pre_attn_scalar", "positive"),
    ("sliding_window", "count"),
    ("rope_local_base_freq", "positive"),
    ("rope_parameters.full_attention.rope_theta", "positive"),
    ("rope_parameters.sliding_attention.rope_theta", "positive"),
)

GEMMA_GGUF_NAMES = LLAMA_GGUF_LINEARS + (
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "post_attention_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"),
    ("post_feedforward_layernorm", "post_ffw_norm"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
)

# llama.cpp's Gemma layouts whose attention scale is 1/√(hidden/heads) (by block count)
LLAMA_CPP_27B_BLOCKS = {"gemma2": 46, "gemma3": 62}
DEFAULT_ROPE_BASE = 10000.0  # llama.cpp's default freq_base (the Gemma 2 converter writes none)


def _kv(arch: str, key: str, value, vtype: str):
    """``KV("<arch>.<key>", value, GGUFValueType[vtype])`` (gguf is imported on use only)."""
    from gguf import GGUFValueType

    from quantbench.formats.gguf_key import KV

    return KV(f"{arch}.{key}", value, GGUFValueType[vtype])


def _gemma2_arrange(config: dict, kvs: list) -> list:
    """Gemma2Model.set_gguf_parameters writes its own list (not TextModel's): context, width,
    blocks, FFN, heads, kv heads, eps, key/value length, file type, both soft-caps, window. No
    RoPE base: llama.cpp's default 10000 (written only where the model's differs)."""
    a = "gemma2"
    have = {kv.key: kv for kv in kvs}
    order = ["context_length", "embedding_length", "block_count", "feed_forward_length",
             "attention.head_count", "attention.head_count_kv",
             "attention.layer_norm_rms_epsilon"]
    out = [have[f"{a}.{k}"] for k in order if f"{a}.{k}" in have]
    head_dim = int(config.get("head_dim") or config["hidden_size"] //
                   config["num_attention_heads"])
    out += [_kv(a, "attention.key_length", head_dim, "UINT32"),
            _kv(a, "attention.value_length", head_dim, "UINT32"), have["general.file_type"]]
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(key) is not None:
            out.append(_kv(a, key, float(config[key]), "FLOAT32"))
    if config.get("sliding_window") is not None:
        out.append(_kv(a, "attention.sliding_window", int(config["sliding_window"]),
                       "UINT32"))
    base = have.get(f"{a}.rope.freq_base")
    if base is not None and float(base.value) != DEFAULT_ROPE_BASE:
        out.append(base)
    return out


def _gemma3_arrange(config: dict, kvs: list) -> list:
    """TextModel's keys (RoPE bases of global and sliding layers included) then, after the
    file type, what Gemma3Model.set_gguf_parameters adds: the final soft-cap where set and the
    sliding window."""
    a = "gemma3"
    out = list(kvs)
    keys = {kv.key for kv in out}
    local = config.get("rope_local_base_freq")  # a transformers 4 config's sliding RoPE base
    if local is not None and f"{a}.rope.freq_base_swa" not in keys:
        at = next((i + 1 for i, kv in enumerate(out) if kv.key == f"{a}.rope.freq_base"), None)
        if at is not None:
            out.insert(at, _kv(a, "rope.freq_base_swa", float(local), "FLOAT32"))
    if config.get("final_logit_softcapping"):
        out.append(_kv(a, "final_logit_softcapping", float(config["final_logit_softcapping"]),
                       "FLOAT32"))
    if config.get("sliding_window_pattern") != 1 and config.get("sliding_window") is not None:
        out.append(_kv(a, "attention.sliding_window", int(config["sliding_window"]), "UINT32"))
    return out


def _attention_scalar(arch: str, meta, kwargs: dict) -> float:
    """llama.cpp's attention scale rule as transformers' ``query_pre_attn_scalar``."""
    if kwargs["num_hidden_layers"] == LLAMA_CPP_27B_BLOCKS[arch]:
        return kwargs["hidden_size"] // kwargs["num_attention_heads"]
    return meta.head_dim


def _layer_types(meta, kwargs: dict, period: int) -> list[str]:
    """Sliding/global layers as llama.cpp runs them: the ``sliding_window_pattern`` key (a
    per-layer array or a period) or the family's period; the last layer of a period is global."""
    pattern = meta.field(f"{meta.arch}.attention.sliding_window_pattern")
    n = kwargs["num_hidden_layers"]
    if isinstance(pattern, list):
        return ["sliding_attention" if s else "full_attention" for s in pattern]
    period = int(pattern) if pattern is not None else period
    return ["sliding_attention" if period > 1 and (i + 1) % period else "full_attention"
            for i in range(n)]


def _optional(meta, key: str, read) -> float | int | None:
    """``<arch>.<key>`` read by ``meta.real``/``meta.count``, None where the file has none."""
    return None if meta.field(f"{meta.arch}.{key}") is None else read(key)


def _common_gguf_config(arch: str, meta, kwargs: dict, period: int) -> None:
    kwargs.pop("hidden_act", None)
    kwargs.update(head_dim=meta.head_dim, hidden_activation="gelu_pytorch_tanh",
                  query_pre_attn_scalar=_attention_scalar(arch, meta, kwargs),
                  final_logit_softcapping=_optional(meta, "final_logit_softcapping", meta.real),
                  layer_types=_layer_types(meta, kwargs, period))
    window = _optional(meta, "attention.sliding_window", meta.count)
    if window is not None:
        kwargs["sliding_window"] = window


def _gemma2_gguf_config(meta, kwargs: dict) -> None:
    """gemma2 GGUF → Gemma2Config entries: soft-caps (llama.cpp's defaults 50 and 30 where the
    file has none), window (4096), head dim, GeGLU, layer kinds."""
    _common_gguf_config("gemma2", meta, kwargs, period=2)
    kwargs["attn_logit_softcapping"] = meta.real("attn_logit_softcapping", 50.0)
    kwargs["final_logit_softcapping"] = meta.real("final_logit_softcapping", 30.0)
    kwargs.setdefault("sliding_window", 4096)


def _gemma3_gguf_config(meta, kwargs: dict) -> None:
    """gemma3 GGUF → Gemma3TextConfig entries; RoPE bases per layer kind (global
    ``rope.freq_base``, sliding ``rope.freq_base_swa``)."""
    _common_gguf_config("gemma3", meta, kwargs, period=6)
    theta = kwargs.pop("rope_theta", None)
    full = kwargs.pop("rope_parameters", None) or {"rope_type": "default", "rope_theta": theta}
    kwargs["rope_parameters"] = {
        "full_attention": full,
        "sliding_attention": {"rope_type": "default",
                              "rope_theta": meta.real("rope.freq_base_swa", DEFAULT_ROPE_BASE)}}
    if meta.field(f"{meta.arch}.attention.sliding_window") is None:  # llama.cpp: no SWA
        kwargs["layer_types"] = ["full_attention"] * kwargs["num_hidden_layers"]


def _gemma2_kvs(config: dict) -> list:
    """No keys beyond ``_gemma2_arrange``'s; refuses an untied output head: llama.cpp's gemma2
    always runs the head from ``token_embd`` and fails to load a file holding ``output.weight``
    ("wrong number of tensors"; the converter drops ``lm_head`` instead — a different model).
    Gemma 3's loader takes a separate head, so only Gemma 2 is refused."""
    if config.get("tie_word_embeddings") is False:
        raise ConfigError("this Gemma 2 checkpoint has its own lm_head (tie_word_embeddings: "
                          "false), which llama.cpp's gemma2 architecture cannot hold (it "
                          "always reuses token_embd); write another format")
    return []


GEMMA2 = ArchSpec(
    family="gemma2", model_types=("gemma2",), gguf_arch="gemma2",
    linears=LLAMA_LINEARS, norms=GEMMA2_NORMS, sublayers=GEMMA_SUBLAYERS,
    scale_folding=GEMMA_SCALE_FOLDING, shapes=GEMMA2_SHAPES,
    biases=(("attention_bias", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                "self_attn.o_proj")),),
    tied_by_default=True, hyperparameters=GEMMA_HYPERPARAMETERS, norm_offset=1.0,
    gguf_norm_plus_offset=True, hf_classes=("Gemma2Config", "Gemma2ForCausalLM"),
    gguf_arrange=_gemma2_arrange, gguf_spm_space_prefix=False, gguf_config=_gemma2_gguf_config,
    gguf_kvs=_gemma2_kvs, gguf_names=GEMMA_GGUF_NAMES[:11])

GEMMA3 = ArchSpec(
    family="gemma3", model_types=("gemma3_text",), gguf_arch="gemma3",
    linears=LLAMA_LINEARS, norms=GEMMA2_NORMS + QK_NORMS, sublayers=GEMMA_SUBLAYERS,
    scale_folding=GEMMA_SCALE_FOLDING, shapes=GEMMA3_SHAPES,
    biases=GEMMA2.biases, tied_by_default=True, hyperparameters=GEMMA_HYPERPARAMETERS,
    norm_offset=1.0, gguf_norm_plus_offset=True,
    hf_classes=("Gemma3TextConfig", "Gemma3ForCausalLM"),
    gguf_arrange=_gemma3_arrange, gguf_spm_space_prefix=False, gguf_config=_gemma3_gguf_config,
    gguf_names=GEMMA_GGUF_NAMES)

# multimodal Gemma 3 (Gemma3ForConditionalGeneration): the text decoder under
# model.language_model, quantized as GEMMA3; the vision tower and projector copied through.
# Checkpoints (the Hub's, and transformers 5's save_pretrained) store the older layout
# (language_model.model.*, vision_tower.vision_model.*): renamed to the module paths on load
MM = "model.language_model"
GEMMA3_MM = replace(
    GEMMA3, family="gemma3", model_types=("gemma3",), block_prefix=f"{MM}.layers",
    base_model=MM, rotary=f"{MM}.rotary_emb", embed=f"{MM}.embed_tokens", final_norm=f"{MM}.norm",
    shapes=tuple((f"{MM}.{m[len('model.'):]}" if m.startswith("model.") else m, dims)
                 for m, dims in GEMMA3_SHAPES),
    hf_classes=("Gemma3Config", "Gemma3ForConditionalGeneration"), config_section="text_config",
    passthrough=(("model.vision_tower", "vision tower"),
                 ("model.multi_modal_projector", "multi-modal projector")),
    checkpoint_renames=((r"^language_model\.model\.", f"{MM}."),
                        (r"^language_model\.lm_head\.", "lm_head."),
                        (r"^vision_tower\.vision_model\.", "model.vision_tower."),
                        (r"^(vision_tower|multi_modal_projector)\.", r"model.\1.")))
