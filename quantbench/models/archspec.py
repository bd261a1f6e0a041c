"""The vocabulary architectures are declared in (``ArchSpec``, ``Sublayer``, ``Fused``) and the
llama layout the families start from — a leaf module: the families
(``quantbench/models/families/``) import it, ``models/arch.py`` registers them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from quantbench.errors import ModelLoadError

LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass(frozen=True)
class Sublayer:
    """One residual branch of a decoder block: ``x + mixer(norm(x))``, or
    ``x + post_norm(mixer(norm(x)))`` where the family norms the branch output too (Gemma 2/3,
    OLMo 2: ``post_norm``).

    ``inputs`` are the linears that read ``norm(x)`` directly; ``output`` is the linear whose
    output is the mixer's output. Knowing this lets the calibration pipeline run a block branch
    by branch and skip forward passes (see ``calibration/pipeline.py``)."""

    norm: str
    mixer: str
    inputs: tuple[str, ...]
    output: str | None  # None: no single output linear (routed experts sum their outputs)
    takes_layer_kwargs: bool = False  # attention needs the mask / position embeddings
    values: str | None = None  # attention's value projection (its rows are read per kv head)
    post_norm: str | None = None  # a norm on the branch output before the residual add


@dataclass(frozen=True)
class Fused:
    """A projection stored as one linear whose output rows are several logical ones (Phi-3's
    ``self_attn.qkv_proj`` = q, k, v; ``mlp.gate_up_proj`` = gate, up). It is quantized as
    stored (runtimes load it by that name); ``parts`` name the logical linears in row order
    with the size of each as a product of config keys (``"num_attention_heads*head_dim"``),
    so methods and formats can find a part's rows (the value rows an attention-weighted
    statistic covers, the split a GGUF architecture expects)."""

    name: str
    parts: tuple[tuple[str, str], ...]

    def rows(self, config: dict) -> dict[str, slice]:
        """``{part: its rows}`` for a model config; refuses sizes that are not in it."""
        out, start = {}, 0
        for part, size in self.parts:
            n = 1
            for key in size.split("*"):
                value = config_value(config, key)
                if value is None:
                    raise ModelLoadError(f"{self.name}: the config has no {key!r} to size "
                                         f"its {part} rows")
                n *= int(value)
            out[part] = slice(start, start + n)
            start += n
        return out


@dataclass(frozen=True)
class Experts:
    """The routed experts of a mixture-of-experts MLP (Mixtral, Qwen3-MoE), as the model holds
    them once loaded: ``<mixer>.experts.<e>.<gate|up|down>_proj`` linears (the per-expert
    layout older checkpoints store; a checkpoint with transformers 5's fused 3-D parameters
    ``<mixer>.experts.gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` is read as views of
    those) and a router ``<mixer>.gate`` ([E, H], never quantized). ``count_keys`` /
    ``top_k_key`` / ``size_key`` name the config's expert count, experts per token and
    per-expert intermediate size; ``normalize_key`` whether the top-k weights are
    renormalised (None: always, as Mixtral); ``gguf_arch_experts`` the GGUF key suffix.
    ``ArchSpec.for_config`` expands a spec to a model's expert count; see
    ``models/experts.py`` for the module that runs them."""

    count_keys: tuple[str, ...]  # the first the config holds (transformers renamed some)
    size_key: str
    top_k_key: str = "num_experts_per_tok"
    normalize_key: str | None = None
    mixer: str = "mlp"
    projections: tuple[tuple[str, str], ...] = (("gate_proj", "ffn_gate_exps"),
                                                ("up_proj", "ffn_up_exps"),
                                                ("down_proj", "ffn_down_exps"))
    router_gguf: str = "ffn_gate_inp"

    @property
    def router(self) -> str:
        return f"{self.mixer}.gate"

    @property
    def module(self) -> str:
        return f"{self.mixer}.experts"

    def linear(self, expert: int, projection: str) -> str:
        return f"{self.module}.{expert}.{projection}"

    def parse(self, linear: str) -> tuple[int, str] | None:
        """``(expert, projection)`` of an expert linear (block-relative), else None."""
        head = self.module + "."
        if not linear.startswith(head):
            return None
        index, _, projection = linear[len(head):].partition(".")
        return (int(index), projection) if index.isdigit() and projection else None

    def count_key(self, config: dict) -> str:
        """The config key that holds the expert count (the first of ``count_keys`` present)."""
        return next((k for k in self.count_keys if config.get(k) is not None),
                    self.count_keys[0])

    def count(self, config: dict) -> int:
        return int(config[self.count_key(config)])

    def top_k(self, config: dict) -> int:
        return int(config[self.top_k_key])


def config_value(config: dict, key: str):
    """A config entry; ``head_dim`` defaults to ``hidden_size / num_attention_heads``."""
    if config.get(key) is not None:
        return config[key]
    if key == "head_dim" and config.get("hidden_size") and config.get("num_attention_heads"):
        return config["hidden_size"] // config["num_attention_heads"]
    if key == "num_key_value_heads":
        return config.get("num_attention_heads")
    return None


# every tensor a llama-family checkpoint holds, as (module, shape of its ``.weight``) with each
# dimension a product of config keys (see ``config_value``); block modules are block-relative.
# What ``models/validate.py`` checks a checkpoint's headers against.
LLAMA_SHAPES = (
    ("self_attn.q_proj", ("num_attention_heads*head_dim", "hidden_size")),
    ("self_attn.k_proj", ("num_key_value_heads*head_dim", "hidden_size")),
    ("self_attn.v_proj", ("num_key_value_heads*head_dim", "hidden_size")),
    ("self_attn.o_proj", ("hidden_size", "num_attention_heads*head_dim")),
    ("mlp.gate_proj", ("intermediate_size", "hidden_size")),
    ("mlp.up_proj", ("intermediate_size", "hidden_size")),
    ("mlp.down_proj", ("hidden_size", "intermediate_size")),
    ("input_layernorm", ("hidden_size",)),
    ("post_attention_layernorm", ("hidden_size",)),
    ("model.embed_tokens", ("vocab_size", "hidden_size")),
    ("model.norm", ("hidden_size",)),
    ("lm_head", ("vocab_size", "hidden_size")),
)

# (config flag, linears that carry a ``.bias`` when it is true); flag None: always
LLAMA_BIASES = (
    ("attention_bias", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                        "self_attn.o_proj")),
    ("mlp_bias", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
)

# buffers older transformers saved that the model recomputes from the config: harmless
# leftovers, logged and skipped (regular expressions over tensor names)
DERIVED_BUFFERS = (r"(^|\.)rotary_emb\.(inv_freq|cos_cached|sin_cached)$",)

# scalar hyperparameters the forward and the format writers read, as (config key, kind): a
# present value must be of its kind (``positive``: a finite number > 0, ``count``: an integer
# > 0, ``flag``: true/false); a dotted key is looked up in a nested object
LLAMA_HYPERPARAMETERS = (
    ("rms_norm_eps", "positive"),
    ("rope_theta", "positive"),
    ("rope_parameters.rope_theta", "positive"),
    ("rope_scaling.factor", "positive"),
    ("rope_parameters.factor", "positive"),
    ("max_position_embeddings", "count"),
    ("tie_word_embeddings", "flag"),
    ("attention_bias", "flag"),
    ("mlp_bias", "flag"),
)


# llama.cpp's names of the llama-layout linears (block-relative HF module → GGUF name)
LLAMA_GGUF_LINEARS = (
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
)


LLAMA_SUBLAYERS = (
    Sublayer("input_layernorm", "self_attn",
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj",
             takes_layer_kwargs=True, values="self_attn.v_proj"),
    Sublayer("post_attention_layernorm", "mlp", ("mlp.gate_proj", "mlp.up_proj"),
             "mlp.down_proj"),
)


@dataclass(frozen=True)
class ArchSpec:
    """How one architecture family lays out its checkpoint.

    ``linears`` lists the quantizable linears of a block in forward order;
    ``sequential_groups`` is the true-sequential order (linears sharing an input together);
    ``scale_folding`` pairs a norm/linear with the linears it feeds (AWQ folds scales there);
    ``sublayers`` describes the block as residual branches (None: run it only whole);
    ``gguf_names`` maps block-relative module names to llama.cpp tensor names;
    ``heads_key`` / ``kv_heads_key`` name the config's attention head counts;
    ``shapes`` gives the shape of each module's ``.weight`` from config keys (a module of
    ``linears``/``norms`` without an entry is only required to exist), ``biases`` which linears
    carry a ``.bias`` under which config flag, ``tied_by_default`` what a config without
    ``tie_word_embeddings`` means, ``derived_buffers`` tensor names skipped as leftovers,
    ``hyperparameters`` the scalar config values checked for their kind.

    Per-family numerics and GGUF conventions: ``norm_offset`` — a norm scales by
    ``norm_offset + weight`` (Gemma's ``1 + w``; AWQ folding and GGUF honour it);
    ``gguf_qk_permute`` — llama.cpp's converter interleaves Q/K rows for RoPE (its llama arch);
    ``gguf_norm_plus_offset`` — llama.cpp stores norm weights with ``norm_offset`` added;
    ``hf_classes`` — transformers' config and model class names (GGUF import builds these);
    ``gguf_kvs(config) -> list[KV]`` — the ``<arch>.*`` keys the converter writes beyond the
    common ones (appended after them); ``gguf_config(meta, kwargs)`` — on import, adds the
    family's config entries to ``kwargs`` from the GGUF metadata (``meta``: see
    ``models/gguf_import.py`` ``Metadata``); ``gguf_params(config) -> list[KV]`` — for a
    family whose converter class writes its own hyperparameter block instead of TextModel's
    (Phi-3), the whole ``<arch>.*`` block in its order, replacing the common one (raising
    ConfigError for what the writer cannot express), with ``general.file_type`` placed before
    the key ``gguf_file_type_before`` (None: after the block); ``gguf_arrange(config, kvs) ->
    list[KV]`` — for a converter class that writes its own list instead of TextModel's (Gemma
    2) or adds keys after ``general.file_type`` (Gemma 3): gets the ``<arch>.*`` keys with
    ``general.file_type`` placed, returns them as the converter orders them;
    ``gguf_generated`` — GGUF names of tensors the converter makes from the config (Phi-3's
    LongRoPE ``rope_factors_long/short.weight``): no checkpoint tensor, skipped as weights on
    import (``gguf_config`` reads them back into the config, ``Metadata.floats``);
    ``gguf_generate(config) -> (list[KV], {GGUF name: float32 tensor})`` — what the
    converter's ``generate_extra_tensors`` writes for this config: its keys (written before
    ``general.type``: the converter makes these tensors before its metadata) and its tensors
    (written first), both empty where the config needs none. Each family lives in one file of
    ``quantbench/models/families/``.

    Multimodal wrappers (a text decoder inside a vision-language checkpoint): ``config_section``
    names the config object that holds the decoder's hyperparameters (``text_config``; read
    through :meth:`hparams`), ``passthrough`` the ``(tensor-name prefix, what it is)`` of the
    parts that are never quantized: copied through as stored, checked only for finiteness,
    reported as kept in 16-bit, left out of a GGUF. ``checkpoint_renames``: ``(regex,
    replacement)`` pairs, the first that matches renames a stored tensor to the model's module
    path (an older layout transformers still saves and loads, e.g. ``language_model.model.*``);
    outputs are written under the module paths, which transformers loads as they are.
    """

    family: str
    model_types: tuple[str, ...]
    block_prefix: str = "model.layers"
    num_blocks_key: str = "num_hidden_layers"
    linears: tuple[str, ...] = LLAMA_LINEARS
    sequential_groups: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    scale_folding: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    )
    sublayers: tuple[Sublayer, ...] | None = LLAMA_SUBLAYERS
    base_model: str = "model"
    rotary: str = "model.rotary_emb"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    gguf_arch: str = "llama"
    heads_key: str = "num_attention_heads"
    kv_heads_key: str = "num_key_value_heads"  # absent from a config: as many as heads
    fused: tuple[Fused, ...] = ()  # projections stored as one linear of several logical ones
    shapes: tuple[tuple[str, tuple[str, ...]], ...] = LLAMA_SHAPES
    biases: tuple[tuple[str | None, tuple[str, ...]], ...] = LLAMA_BIASES
    tied_by_default: bool = False  # transformers' default tie_word_embeddings for the family
    derived_buffers: tuple[str, ...] = DERIVED_BUFFERS
    hyperparameters: tuple[tuple[str, str], ...] = LLAMA_HYPERPARAMETERS
    norm_offset: float = 0.0
    gguf_qk_permute: bool = False
    gguf_norm_plus_offset: bool = False
    hf_classes: tuple[str, str] = ("LlamaConfig", "LlamaForCausalLM")
    gguf_kvs: Callable[[dict], list] | None = None
    gguf_config: Callable[[Any, dict], None] | None = None
    gguf_params: Callable[[dict], list] | None = None
    gguf_file_type_before: str | None = None
    gguf_arrange: Callable[[dict, list], list] | None = None
    gguf_generated: tuple[str, ...] = ()
    gguf_generate: Callable[[dict], tuple[list, dict]] | None = None
    gguf_spm_space_prefix: bool | None = None  # tokenizer.ggml.add_space_prefix written after
    #   a SentencePiece vocabulary (Gemma's converter: False), None: not written
    config_section: str | None = None  # the config key holding the decoder's hyperparameters
    passthrough: tuple[tuple[str, str], ...] = ()  # (tensor prefix, what it is): never quantized
    checkpoint_renames: tuple[tuple[str, str], ...] = ()  # (stored-name regex, replacement)
    output_renames: tuple[tuple[str, str], ...] = ()  # module path → the name outputs store
    gguf_names: tuple[tuple[str, str], ...] = LLAMA_GGUF_LINEARS + (
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
    )
    kept: tuple[str, ...] = ()  # block modules with a weight never quantized (an MoE router)
    experts: Experts | None = None  # a mixture-of-experts MLP (expanded by for_config)
    num_experts: int = 0  # set by for_config: the model's expert count

    def for_config(self, config: dict) -> "ArchSpec":
        """This spec for one model: a mixture-of-experts family expanded to the config's
        expert count (every expert's linears, groups, shapes and folding pairs named); any
        other family as it is."""
        if self.experts is None or self.num_experts:
            return self
        from quantbench.models.experts import expand

        return expand(self, self.hparams(config))

    def hparams(self, config: dict) -> dict:
        """The decoder's hyperparameters: ``config`` itself, or a multimodal wrapper's
        ``config_section`` object, with the top level's ``tie_word_embeddings`` where it has
        one (transformers ties the wrapper's ``lm_head`` by that)."""
        if self.config_section is None:
            return config
        section = config.get(self.config_section)
        if not isinstance(section, dict):
            raise ModelLoadError(f"config.json has no {self.config_section!r} object, which a "
                                 f"{self.family} checkpoint keeps its text model's settings in; "
                                 "fix config.json (see the model's original config)")
        out = dict(section)
        if config.get("tie_word_embeddings") is not None:
            out["tie_word_embeddings"] = config["tie_word_embeddings"]
        return out

    def module_name(self, stored: str) -> str:
        """A stored tensor name as the model's module path (``checkpoint_renames``)."""
        for pattern, replacement in self.checkpoint_renames:
            new, n = re.subn(pattern, replacement, stored, count=1)
            if n:
                return new
        return stored

    def output_name(self, name: str) -> str:
        """A module path (or a tensor under it) as the safetensors outputs store it
        (``output_renames``: Mixtral's experts under ``block_sparse_moe``); read back through
        ``checkpoint_renames``."""
        for pattern, replacement in self.output_renames:
            new, n = re.subn(pattern, replacement, name, count=1)
            if n:
                return new
        return name

    def passthrough_part(self, tensor_name: str) -> str | None:
        """What a tensor copied through unquantized belongs to (``vision tower``), or None."""
        return next((what for prefix, what in self.passthrough
                     if tensor_name.startswith(prefix + ".")), None)

    def head_counts(self, config: dict) -> tuple[int, int]:
        """``(attention heads, kv heads)`` of a model config."""
        heads = int(config[self.heads_key])
        return heads, int(config.get(self.kv_heads_key) or heads)

    def attention_kinds(self, config: dict, num_blocks: int) -> list[str]:
        """Each layer's attention kind, as transformers names them: ``config["layer_types"]``
        where the config lists them (alternating ``sliding_attention`` / ``full_attention``),
        else ``sliding_attention`` everywhere for a model with a sliding window in use, else
        ``full_attention``. The calibration layer does not need this (each layer's own mask is
        captured from the model); reports and GGUF metadata do."""
        kinds = config.get("layer_types")
        if kinds:
            if len(kinds) != num_blocks:
                raise ModelLoadError(f"config layer_types lists {len(kinds)} layers, the model "
                                     f"has {num_blocks}")
            return list(kinds)
        sliding = config.get("sliding_window") and config.get("use_sliding_window", True)
        return ["sliding_attention" if sliding else "full_attention"] * num_blocks

    def fused_parts(self, linear: str) -> Fused | None:
        """The declaration of a fused projection (block-relative name), or None."""
        return next((f for f in self.fused if f.name == linear), None)

    def fused_of(self, part: str) -> Fused | None:
        """The fused projection whose rows hold the logical linear ``part`` (Phi-3's
        ``self_attn.v_proj`` → ``self_attn.qkv_proj``), or None."""
        return next((f for f in self.fused if part in dict(f.parts)), None)

    def stored(self, linear: str, config: dict) -> tuple[str, slice | None]:
        """Where a linear's weight rows live: ``(linear, None)`` for a stored linear, ``(fused
        linear, its rows)`` for a part of a fused one."""
        fused = self.fused_of(linear)
        return (linear, None) if fused is None else (fused.name, fused.rows(config)[linear])

    def block_module(self, index: int, name: str) -> str:
        return f"{self.block_prefix}.{index}.{name}"

    def gguf_tensor_name(self, tensor_name: str) -> str:
        """HF tensor name → llama.cpp tensor name (``blk.3.attn_q.weight``, ``output.weight``)."""
        base, _, suffix = tensor_name.rpartition(".")
        index = self.block_of(tensor_name)
        if index is not None:
            module = base[len(f"{self.block_prefix}.{index}."):]
            for hf, gg in self.gguf_names:
                if hf == module:
                    return f"blk.{index}.{gg}.{suffix}"
        top = dict(self.gguf_top_names())
        if base in top:
            return f"{top[base]}.{suffix}"
        raise ModelLoadError(f"{tensor_name} has no GGUF name in the {self.family} mapping")

    def gguf_top_names(self) -> tuple[tuple[str, str], ...]:
        """``(HF module, llama.cpp name)`` of the tensors outside the blocks."""
        return ((self.embed, "token_embd"), (self.final_norm, "output_norm"),
                (self.lm_head, "output"))

    def hf_tensor_name(self, gguf_name: str) -> str:
        """llama.cpp tensor name → HF tensor name (the inverse of :meth:`gguf_tensor_name`)."""
        base, _, suffix = gguf_name.rpartition(".")
        parts = base.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[1].isdigit():
            for hf, gg in self.gguf_names:
                if gg == parts[2]:
                    return f"{self.block_prefix}.{parts[1]}.{hf}.{suffix}"
        for hf, gg in self.gguf_top_names():
            if gg == base:
                return f"{hf}.{suffix}"
        raise ModelLoadError(f"unexpected GGUF tensor {gguf_name!r}; is this a {self.family}-"
                             "family model?")

    def block_of(self, tensor_name: str) -> int | None:
        """Index of the decoder block a tensor belongs to, or None for non-block tensors."""
        prefix = self.block_prefix + "."
        if not tensor_name.startswith(prefix):
            return None
        head = tensor_name[len(prefix) :].split(".", 1)[0]
        return int(head) if head.isdigit() else None


def _llama_gguf_config(meta, kwargs: dict) -> None:
    """llama arch GGUF → LlamaConfig entries the common keys do not give."""
    kwargs.update(head_dim=meta.head_dim, attention_bias="blk.0.attn_q.bias" in meta.names,
                  mlp_bias="blk.0.ffn_up.bias" in meta.names)


LLAMA = ArchSpec(family="llama", model_types=("llama", "mistral"), gguf_qk_permute=True,
                 gguf_config=_llama_gguf_config)
QWEN2 = ArchSpec(family="qwen2", model_types=("qwen2",), gguf_arch="qwen2",
                 biases=((None, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),),
                 hf_classes=("Qwen2Config", "Qwen2ForCausalLM"))
