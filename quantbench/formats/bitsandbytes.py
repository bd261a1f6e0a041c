"""``bitsandbytes``: the state dict transformers writes for ``load_in_4bit`` (NF4/FP4, optional
double quantization) and ``load_in_8bit`` (LLM.int8), FORMATS.md §3, loaded back unchanged by
transformers + bitsandbytes."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from quantbench.config import CodebookGridConfig, Int8RowGridConfig, QuantizeConfig
from quantbench.errors import ConfigError, FormatError
from quantbench.formats.base import Artifact, Format, TensorSummary
from quantbench.formats.gptq import module_of, quant_method, refuse_embeddings, untargeted_modules
from quantbench.formats.packing import pack_nibbles_hi_first, unpack_nibbles_hi_first
from quantbench.jsonfile import NonFiniteJSON, dumps
from quantbench.lazy import torch
from quantbench.models.arch import ArchSpec
from quantbench.models.loader import torch_dtype
from quantbench.models.weights import LazyWeights
from quantbench.quant import bnb
from quantbench.quant.grids.base import check_scale_shape, count_bits
from quantbench.registry import register_format
from quantbench.tensor import QuantizedTensor

STATE = "weight.quant_state.bitsandbytes__"
FOUR_BIT_PARTS = ("weight.absmax", "weight.quant_map", "weight.nested_absmax",
                  "weight.nested_quant_map")
EIGHT_BIT_PARTS = ("SCB", "weight_format")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def encode_4bit(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """Suffix → tensor for one NF4/FP4 linear (``Linear4bit._save_to_state_dict``)."""
    grid = qt.grid
    state: dict[str, Any] = {"quant_type": grid.codebook, "blocksize": grid.block_size,
                             "dtype": _dtype_name(qt.dtype), "shape": list(qt.shape)}
    parts = {"weight": pack_nibbles_hi_first(qt.codes),
             "weight.absmax": qt.scales.reshape(-1).contiguous(),
             "weight.quant_map": bnb.codebook(grid.codebook).clone()}
    if grid.double_quant:
        parts["weight.nested_absmax"] = qt.aux["nested_absmax"].reshape(-1).contiguous()
        parts["weight.nested_quant_map"] = bnb.dynamic_map_signed().clone()
        state.update({"nested_blocksize": grid.nested_block_size, "nested_dtype": "float32",
                      "nested_offset": float(qt.aux["nested_offset"])})
    blob = dumps(state, what="a bitsandbytes quant_state").encode("utf-8")
    parts[STATE + grid.codebook] = torch.tensor(list(blob), dtype=torch.uint8)
    return parts


def encode_8bit(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """Suffix → tensor for one LLM.int8 linear (``Linear8bitLt._save_to_state_dict``)."""
    return {"weight": qt.int8_codes().contiguous(), "SCB": qt.scales.reshape(-1).float(),
            "weight_format": torch.tensor(0, dtype=torch.uint8)}


def quant_state(raw: bytes, module: str, state_key: str
                ) -> tuple[dict[str, Any], list[int], CodebookGridConfig]:
    """A 4-bit linear's quant state (the JSON bitsandbytes stores as a uint8 tensor): the
    state, the weight's shape and its grid, checked."""
    try:
        state = json.loads(raw.decode("utf-8"))
        codebook, block = state["quant_type"], int(state["blocksize"])
        shape = [int(d) for d in state["shape"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{module}.{state_key} is not a valid bitsandbytes quant state "
                          f"({exc}); the checkpoint is damaged") from exc
    if state_key != STATE + codebook or len(shape) != 2:
        raise FormatError(f"{module}: quant state {state_key} says {codebook} {shape}; the "
                          "checkpoint is inconsistent")
    try:
        grid = CodebookGridConfig(codebook, block, "nested_offset" in state)
    except ConfigError as exc:
        raise FormatError(f"{module}: {exc}") from exc
    return state, shape, grid


def summary_4bit(weights, module: str, state_key: str) -> TensorSummary:
    """What :func:`decode_4bit` gives, from the headers and the quant state (the tables'
    values are not compared)."""
    get = _Getter(weights)
    state, shape, grid = quant_state(weights.raw(get.present(f"{module}.{state_key}")), module,
                                     state_key)
    get.present(f"{module}.weight.quant_map")
    n = shape[0] * shape[1]
    get.present(f"{module}.weight")
    absmax = f"{module}.weight.absmax"
    n_blocks = math.prod(weights.shape(get.present(absmax)))
    aux_bits = 0
    if grid.double_quant:
        if int(state.get("nested_blocksize", 256)) != grid.nested_block_size:
            raise FormatError(f"{module}: only bitsandbytes' 256-block dynamic-map double "
                              "quantization is supported")
        get.present(f"{module}.weight.nested_quant_map")
        aux_bits = math.prod(weights.shape(get.present(f"{module}.weight.nested_absmax"))) * 32
        aux_bits += 32  # nested_offset, a float32 scalar
    if n_blocks != grid.n_blocks(n):
        raise ValueError(f"a {grid.describe()} weight of {n} values needs absmax of shape "
                         f"(1, {grid.n_blocks(n)}), got (1, {n_blocks})")
    bits = count_bits(n, grid.bits, n_blocks * weights.element_bits(absmax), aux_bits)
    return TensorSummary(tuple(shape), grid, bits + grid.table_bits(grid.double_quant))


def summary_8bit(weights, module: str) -> TensorSummary:
    """What :func:`decode_8bit` gives, from the headers (and ``weight_format``)."""
    get = _Getter(weights)
    if f"{module}.weight_format" in get.names and weights.ints(f"{module}.weight_format")[0]:
        fmt = weights.ints(f"{module}.weight_format")[0]
        raise FormatError(f"{module}: weight_format {fmt} is a GPU tile layout; only the row "
                          "layout (0) is supported")
    cb = get.present(f"{module}.weight")
    if weights.dtype_name(cb) != "int8":
        raise FormatError(f"{module}.weight is torch.{weights.dtype_name(cb)}, not int8; the "
                          "checkpoint is damaged")
    out_f, in_f = weights.shape(cb)
    n_scales = math.prod(weights.shape(get.present(f"{module}.SCB")))
    grid = Int8RowGridConfig()
    check_scale_shape(n_scales, 1, out_f, 1, False, grid.describe())
    return TensorSummary((out_f, in_f), grid, count_bits(out_f * in_f, grid.bits, n_scales * 32))


def decode_4bit(get, module: str, state_key: str) -> QuantizedTensor:
    state, shape, grid = quant_state(bytes(get(f"{module}.{state_key}").tolist()), module,
                                     state_key)
    codebook, nested = grid.codebook, grid.double_quant
    dtype = torch_dtype(state.get("dtype", "float16"), torch.float16)
    if not torch.equal(get(f"{module}.weight.quant_map").float(), bnb.codebook(codebook)):
        raise FormatError(f"{module}: a custom 4-bit quant_map is not supported; only the "
                          "standard nf4/fp4 tables")
    n = shape[0] * shape[1]
    codes = unpack_nibbles_hi_first(get(f"{module}.weight"), n).reshape(shape)
    scales = get(f"{module}.weight.absmax").reshape(1, -1)
    aux: dict[str, torch.Tensor] = {}
    if nested:
        if int(state.get("nested_blocksize", 256)) != grid.nested_block_size or not torch.equal(
                get(f"{module}.weight.nested_quant_map").float(), bnb.dynamic_map_signed()):
            raise FormatError(f"{module}: only bitsandbytes' 256-block dynamic-map double "
                              "quantization is supported")
        aux = {"nested_absmax": get(f"{module}.weight.nested_absmax").float().reshape(-1),
               "nested_offset": torch.tensor(float(state["nested_offset"]), dtype=torch.float32)}
    return QuantizedTensor(codes=codes, scales=scales, zeros=None, grid=grid, dtype=dtype,
                           aux=aux)


def decode_8bit(get, module: str, dtype: torch.dtype) -> QuantizedTensor:
    if f"{module}.weight_format" in get.names and int(get(f"{module}.weight_format")) != 0:
        raise FormatError(f"{module}: weight_format {int(get(f'{module}.weight_format'))} is a "
                          "GPU tile layout; only the row layout (0) is supported")
    cb = get(f"{module}.weight")
    if cb.dtype != torch.int8:
        raise FormatError(f"{module}.weight is {cb.dtype}, not int8; the checkpoint is damaged")
    codes = (cb.to(torch.int16) + 128).to(torch.uint8)
    return QuantizedTensor(codes=codes, scales=get(f"{module}.SCB").float().reshape(-1, 1),
                           zeros=None, grid=Int8RowGridConfig(), dtype=dtype)


class _Getter:
    """``get(name)`` over an artifact's weights; a missing part is a clear FormatError."""

    def __init__(self, weights: LazyWeights):
        self.weights = weights
        self.names = set(weights.names())

    def __call__(self, name: str) -> torch.Tensor:
        return self.weights.get(self.present(name))

    def present(self, name: str) -> str:
        if name not in self.names:
            raise FormatError(f"{name} is missing; the bitsandbytes checkpoint is incomplete")
        return name


@register_format("bitsandbytes")
class BitsAndBytesFormat(Format):
    description = "bitsandbytes NF4/FP4 (load_in_4bit) or LLM.int8 (load_in_8bit), as transformers saves"

    def check(self, config: QuantizeConfig, model: Any, targets: list[str]) -> None:
        if config.grid.kind not in ("codebook", "int8_row"):
            raise ConfigError(f"bitsandbytes stores nf4/fp4 or LLM.int8 weights, not "
                              f"{config.grid.describe()}; use --method nf4, fp4 or llm_int8, or "
                              "--format gptq / compressed-tensors for this method")
        refuse_embeddings("bitsandbytes", model, targets)
        if f"{model.arch.lm_head}.weight" in targets:
            raise ConfigError("transformers keeps lm_head in 16-bit in bitsandbytes "
                              "checkpoints; drop --quantize-lm-head or use --format dense")
        spec = model.arch.experts
        if spec is not None and any(f".{spec.module}." in t for t in targets):
            raise ConfigError("transformers holds mixture-of-experts experts as fused 3-D "
                              "parameters, which its bitsandbytes loading does not quantize; "
                              f"add --exclude '{spec.module}' (attention only) or use --format "
                              "gptq, compressed-tensors or gguf")

    def quantization_config(self, config: QuantizeConfig, targets: list[str],
                            arch: ArchSpec) -> dict[str, Any]:
        """``BitsAndBytesConfig.to_dict()`` keys (§3.3)."""
        grid, four = config.grid, config.grid.kind == "codebook"
        # transformers quantizes every other Linear on load: the passthrough parts stay 16-bit
        skipped = untargeted_modules(targets, arch) + [prefix for prefix, _ in arch.passthrough]
        threshold = 6.0 if four else float(config.options.threshold)  # LLM.int8's option
        return {"quant_method": "bitsandbytes", "_load_in_4bit": four, "_load_in_8bit": not four,
                "load_in_4bit": four, "load_in_8bit": not four,
                "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
                "bnb_4bit_quant_type": grid.codebook if four else "fp4",
                "bnb_4bit_use_double_quant": bool(four and grid.double_quant),
                "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
                "llm_int8_skip_modules": [*skipped, arch.lm_head] if skipped else None,
                "llm_int8_threshold": threshold}

    def encode(self, name: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        module = module_of(name)
        try:
            parts = encode_4bit(qt) if qt.grid.kind == "codebook" else encode_8bit(qt)
        except NonFiniteJSON as exc:  # the double-quant offset of absmax scales with NaN/Inf
            raise FormatError(f"{name}: its quant_state holds {exc.value} at {exc.where} (the "
                              "weight holds NaN/Inf values); bitsandbytes cannot store it, "
                              "and no runtime could use it") from None
        return {f"{module}.{k}": v for k, v in parts.items()}

    @classmethod
    def detect(cls, config: dict[str, Any], weights: LazyWeights) -> bool:
        return quant_method(config, weights) == "bitsandbytes"

    def read(self, path: Path, config: dict[str, Any], weights: LazyWeights,
             manifest: dict[str, Any] | None) -> Artifact:
        q = config.get("quantization_config") or {}
        threshold = q.get("llm_int8_threshold", 6.0)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not math.isfinite(threshold):
            raise FormatError(f"{path}: llm_int8_threshold {threshold!r} is not a number")
        get = _Getter(weights)
        states = {n.split(f".{STATE}")[0]: n for n in get.names if f".{STATE}" in n}
        eight = sorted(n[: -len(".SCB")] for n in get.names if n.endswith(".SCB"))
        orphans = [n for n in get.names if n.endswith(".weight.absmax")
                   and n[: -len(".weight.absmax")] not in states]
        if orphans:
            raise FormatError(f"{orphans[0]} has no weight.quant_state.bitsandbytes__nf4/fp4 "
                              "beside it; the checkpoint is incomplete (re-save it)")
        modules = {m: "4bit" for m in states} | {m: "8bit" for m in eight}
        parts = {f"{m}.{s}" for m in states for s in FOUR_BIT_PARTS} | set(states.values()) \
            | {f"{m}.{s}" for m in eight for s in EIGHT_BIT_PARTS}
        quantized = sorted(f"{m}.weight" for m in modules)
        plain = [n for n in weights.names() if n not in parts and n not in quantized]

        def decode(art: Artifact, name: str) -> QuantizedTensor:
            module = module_of(name)
            g = get if art.weights is weights else _Getter(art.weights)
            if modules[module] == "4bit":
                return decode_4bit(g, module, states[module][len(module) + 1:])
            dtype = torch_dtype(config.get("dtype") or config.get("torch_dtype"), torch.float16)
            return decode_8bit(g, module, dtype)

        def summarize(art: Artifact, name: str) -> TensorSummary:
            module = module_of(name)
            if modules[module] == "4bit":
                return summary_4bit(art.weights, module, states[module][len(module) + 1:])
            return summary_8bit(art.weights, module)

        runtime = {"llm_int8_threshold": float(threshold)} if eight else {}
        return Artifact(path=path, format=self.name, config=config, weights=weights,
                        manifest=manifest, decode=decode, summarize=summarize,
                        quantized_names=quantized, plain_names=plain, runtime=runtime)
