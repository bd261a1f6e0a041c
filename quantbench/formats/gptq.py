"""GPTQ checkpoints as AutoGPTQ / GPTQModel write them and transformers+optimum, vLLM and
exllamav2 load them. Layout: FORMATS.md §1."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping

from quantbench.config import IntGridConfig, QuantizeConfig
from quantbench.errors import ConfigError, FormatError
from quantbench.formats.base import Artifact, Format, TensorSummary, require_int_grid
from quantbench.formats.packing import pack_bits_lsb_rows, unpack_bits_lsb_rows
from quantbench.jsonfile import dumps
from quantbench.lazy import torch
from quantbench.models.arch import ArchSpec
from quantbench.models.loader import torch_dtype
from quantbench.models.weights import LazyWeights
from quantbench.quant.grid import group_index
from quantbench.quant.grids.base import check_scale_shape, count_bits
from quantbench.registry import register_format
from quantbench.tensor import QuantizedTensor

SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
BITS = (2, 3, 4, 8)
V1, V2 = "gptq", "gptq_v2"  # stored zero − 1 / true zero (§1.4)
CONFIG_FILES = ("quantize_config.json", "quant_config.json")


# -- helpers shared with the AWQ format -------------------------------------------------------

def module_of(weight_name: str) -> str:
    return weight_name[: -len(".weight")]


def refuse_embeddings(label: str, model: Any, targets: list[str]) -> None:
    if f"{model.arch.embed}.weight" in targets:
        raise ConfigError(
            f"{label} stores Linear layers only; drop --quantize-embeddings (a tied lm_head is "
            "the embedding) or use --format dense or compressed-tensors")


def untargeted_modules(targets: list[str], arch: ArchSpec, stored: bool = True) -> list[str]:
    """Linears of the quantized blocks that stay in float (loaders must skip them), named as
    the files store them (``stored``: ``ArchSpec.output_name``; else the module paths)."""
    wanted = set(targets)
    blocks = sorted({b for t in targets if (b := arch.block_of(t)) is not None})
    modules = [arch.block_module(b, lin) for b in blocks for lin in arch.linears]
    name = arch.output_name if stored else str
    return [name(m) for m in modules if f"{m}.weight" not in wanted]


def fp16_scales(qt: QuantizedTensor, label: str) -> torch.Tensor:
    """Scales as fp16 (what GPTQ/AWQ kernels read); refuse a conversion that changes them."""
    scales = qt.scales.to(torch.float16)
    if qt.scales.dtype != torch.float16 and not torch.equal(scales.to(qt.scales.dtype),
                                                            qt.scales):
        raise ConfigError(f"{label} stores fp16 scales and these {qt.scales.dtype} scales do "
                          "not fit fp16 exactly; use --format compressed-tensors or dense")
    return scales


def quant_settings(path: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json["quantization_config"]``, else ``quantize_config.json`` /
    ``quant_config.json`` (AutoGPTQ, GPTQModel, AutoAWQ write these; §1.6, §2.4)."""
    q = config.get("quantization_config")
    if isinstance(q, dict) and q:
        return q
    for name in CONFIG_FILES:
        file = Path(path) / name
        if file.is_file():
            try:
                return json.loads(file.read_text())
            except ValueError as exc:
                raise FormatError(f"{file} is not valid JSON ({exc})") from exc
    return {}


def setting(q: Mapping[str, Any], path: Path, *keys: str, default: Any = None) -> Any:
    """First present key among aliases (``bits``/``w_bit``, ``group_size``/``q_group_size``)."""
    for key in keys:
        if q.get(key) is not None:
            return q[key]
    if default is None:
        raise FormatError(f"{path}: quantization config lacks {keys[0]!r}; the checkpoint is "
                          "incomplete")
    return default


def quant_method(config: Mapping[str, Any], weights: LazyWeights) -> str | None:
    """``quant_method`` from config.json, else from a side file next to the weights (older
    AutoGPTQ / AutoAWQ files lack the key: AWQ's have ``version``/``zero_point``)."""
    q = config.get("quantization_config")
    if isinstance(q, dict) and q:
        return q.get("quant_method")
    files = weights.files()
    if not files or not any((files[0].parent / n).is_file() for n in CONFIG_FILES):
        return None
    q = quant_settings(files[0].parent, {})
    return q.get("quant_method") or ("awq" if "version" in q or "zero_point" in q else "gptq")


def model_dtype(config: Mapping[str, Any], default: torch.dtype) -> torch.dtype:
    return torch_dtype(config.get("dtype") or config.get("torch_dtype"), default)


def split_names(weights: LazyWeights, marker: str, suffixes: tuple[str, ...]
                ) -> tuple[list[str], list[str]]:
    """(quantized ``<module>.weight`` names, every tensor that is not a quantization part)."""
    names = weights.names()
    modules = [n[: -len(marker) - 1] for n in names if n.endswith(f".{marker}")]
    parts = {f"{m}.{s}" for m in modules for s in suffixes}
    return [f"{m}.weight" for m in modules], [n for n in names if n not in parts]


# -- encode / decode one linear (§1.1, §1.3, §1.4, §1.5) ---------------------------------------

def gptq_encode(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """Suffix → tensor: qweight ``[in*b/32, out]``, qzeros ``[groups, out*b/32]``, scales
    ``[groups, out]`` fp16, g_idx ``[in]``. A symmetric grid stores v1 zeros (zero − 1), a
    zero-point grid v2 (true zeros)."""
    grid, (out_f, _) = qt.grid, qt.shape
    n_groups = qt.scales.shape[1]
    zeros = qt.zeros if qt.zeros is not None else torch.full(
        (out_f, n_groups), grid.sym_zero, dtype=torch.int32)
    if grid.symmetric:
        zeros = zeros - 1
    return {
        "qweight": pack_bits_lsb_rows(qt.codes, grid.bits).t().contiguous(),
        "qzeros": pack_bits_lsb_rows(zeros.t().contiguous(), grid.bits),
        "scales": fp16_scales(qt, "GPTQ").t().contiguous(),
        "g_idx": qt.group_index().to(torch.int32).contiguous(),
    }


def gptq_decode(parts: Mapping[str, torch.Tensor], bits: int, group_size: int, sym: bool,
                v1: bool, dtype: torch.dtype | None = None) -> QuantizedTensor:
    """Inverse of ``gptq_encode``; v1 zeros come back as stored + 1 (no wrap, as the kernels
    compute). A trivial g_idx (``c // g``) becomes None; a ``sym`` file whose zeros are not
    all ``2**(b-1)`` is returned on a zero-point grid with its zeros."""
    dtype = dtype or torch.float16
    qweight, g_idx = parts["qweight"], parts.get("g_idx")
    out_f = qweight.shape[1]
    in_f = g_idx.numel() if g_idx is not None else qweight.shape[0] * 32 // bits
    codes = unpack_bits_lsb_rows(qweight.t(), bits, in_f)
    zeros = unpack_bits_lsb_rows(parts["qzeros"], bits, out_f).to(torch.int32) + int(v1)
    zeros = zeros.t().contiguous()
    grid = IntGridConfig.from_group_size(bits, group_size if group_size > 0 else -1, sym)
    if sym and bool((zeros == grid.sym_zero).all()):
        zeros = None
    elif sym:
        grid = dataclasses.replace(grid, symmetric=False)
    if g_idx is not None:
        g_idx = g_idx.to(torch.int32)
        if torch.equal(g_idx, group_index(in_f, grid)):
            g_idx = None
    return QuantizedTensor(codes=codes, scales=parts["scales"].t().contiguous(), zeros=zeros,
                           grid=grid, dtype=dtype, g_idx=g_idx)


def gptq_summary(weights, module: str, bits: int, group_size: int, sym: bool,
                 v1: bool) -> TensorSummary:
    """What :func:`gptq_decode` gives for ``module``, from the headers; of the data, only the
    zero points of a ``sym`` file and the ``g_idx`` are read (the decode's grid and group
    order depend on them)."""
    out_f = weights.shape(f"{module}.qweight")[1]
    g_idx = weights.ints(f"{module}.g_idx") if f"{module}.g_idx" in weights else None
    in_f = len(g_idx) if g_idx is not None else weights.shape(f"{module}.qweight")[0] * 32 // bits
    grid = IntGridConfig.from_group_size(bits, group_size if group_size > 0 else -1, sym)
    groups, words = weights.shape(f"{module}.qzeros")
    n_zeros = groups * out_f
    if sym and all_packed(weights.raw(f"{module}.qzeros"), words, bits, out_f,
                          grid.sym_zero - int(v1)):
        n_zeros = 0
    elif sym:
        grid = dataclasses.replace(grid, symmetric=False)
    trivial = [c // grid.group_size if grid.granularity == "group" else 0 for c in range(in_f)]
    if g_idx == trivial:
        g_idx = None  # the decode drops a g_idx that says c // g
    scales = weights.shape(f"{module}.scales")  # [groups, out]; decoded transposed
    check_scale_shape(scales[1], scales[0], out_f, grid.n_groups(in_f), g_idx is not None,
                 grid.describe())
    return TensorSummary((out_f, in_f), grid, count_bits(
        out_f * in_f, bits, math.prod(scales) * weights.element_bits(f"{module}.scales"),
        n_zeros=n_zeros))


def all_packed(data: bytes, words: int, bits: int, n: int, value: int) -> bool:
    """Whether every row of int32 words ``[rows, words]`` (``pack_bits_lsb_rows``) holds
    ``value`` in each of its first ``n`` fields of ``bits``."""
    want = int(format(value, f"0{bits}b") * n, 2)
    mask, step = (1 << n * bits) - 1, 4 * words
    return all(int.from_bytes(data[i:i + step], "little") & mask == want
               for i in range(0, len(data), step))


@contextlib.contextmanager
def tensors_fit(module: str, label: str) -> Iterator[None]:
    """A part missing or parts that disagree, as one line naming ``module``."""
    try:
        yield
    except KeyError as exc:
        raise FormatError(f"{module} lacks {exc.args[0]}; the checkpoint is incomplete") from exc
    except ValueError as exc:
        raise FormatError(f"{module}: {label} tensors do not fit together ({exc})") from exc


class ModuleTensorsFormat(Format):
    """A layout that stores each quantized linear as named tensors beside its module path
    (``<module>.qweight`` ...) and names itself in ``quantization_config.quant_method``."""

    method_key: ClassVar[str]
    codec: ClassVar[Callable[[QuantizedTensor], dict[str, torch.Tensor]]]
    checkpoint_names = False  # GPTQModel (transformers 5) names experts mlp.experts.N.*_proj

    def encode(self, name: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        module = module_of(name)
        return {f"{module}.{k}": v for k, v in type(self).codec(qt).items()}

    @classmethod
    def detect(cls, config: dict[str, Any], weights: LazyWeights) -> bool:
        return quant_method(config, weights) == cls.method_key


@register_format("gptq")
class GPTQFormat(ModuleTensorsFormat):
    description = "GPTQ qweight/qzeros/scales/g_idx (transformers+optimum, vLLM, exllamav2)"
    method_key = "gptq"
    codec = staticmethod(gptq_encode)

    def check(self, config: QuantizeConfig, model: Any, targets: list[str]) -> None:
        require_int_grid("GPTQ", config)
        refuse_embeddings("GPTQ", model, targets)
        grid = config.grid
        if grid.bits not in BITS:
            raise ConfigError(f"GPTQ stores 2, 3, 4 or 8-bit codes, not {grid.bits}; use "
                              "--bits 4 or --format compressed-tensors")
        if grid.granularity == "tensor":
            raise ConfigError("GPTQ stores a scale per group or per output channel, not per "
                              "tensor; use --group-size 128 (or -1) or --format compressed-tensors")
        multiple = 32 // math.gcd(32, grid.bits)
        for name in targets:
            out_f, in_f = model.weights.shape(name)[:2]
            if in_f % multiple or out_f % multiple:
                raise ConfigError(
                    f"GPTQ packs {grid.bits}-bit codes into int32 words along both dimensions, "
                    f"so they must be multiples of {multiple}; {name} is {out_f}x{in_f}; use "
                    "--format compressed-tensors or dense")

    def quantization_config(self, config: QuantizeConfig, targets: list[str],
                            arch: ArchSpec) -> dict[str, Any]:
        """AutoGPTQ/GPTQModel keys (§1.6); sym → v1 ``gptq``, zero-point → ``gptq_v2``."""
        from quantbench import __version__

        grid, sweep = config.grid, config.options.sweep()
        fmt = V1 if grid.symmetric else V2
        q: dict[str, Any] = {
            "quant_method": "gptq", "bits": grid.bits, "group_size": grid.cli_group_size,
            "desc_act": bool(sweep and sweep.act_order),
            "static_groups": bool(sweep and sweep.static_groups),
            "sym": grid.symmetric, "true_sequential": True,
            "damp_percent": float(sweep.damp_percent if sweep else 0.01),
            "checkpoint_format": fmt, "format": fmt, "pack_dtype": "int32",
            "lm_head": f"{arch.lm_head}.weight" in targets,
            "meta": {"quantizer": [f"quantbench:{__version__}"]},
        }
        skipped = untargeted_modules(targets, arch, stored=False)
        if skipped:  # GPTQModel "dynamic": a "-:" pattern leaves the module unquantized
            q["dynamic"] = {f"-:^{re.escape(m)}$": {} for m in skipped}
        return q

    def extra_files(self, config: QuantizeConfig, targets: list[str],
                    arch: ArchSpec) -> dict[str, str]:
        """AutoGPTQ, GPTQModel and vLLM also read ``quantize_config.json`` (§1.6)."""
        q = self.quantization_config(config, targets, arch)
        return {"quantize_config.json": dumps(q, what="quantize_config.json", indent=2, sort_keys=True)}

    def read(self, path: Path, config: dict[str, Any], weights: LazyWeights,
             manifest: dict[str, Any] | None) -> Artifact:
        q = quant_settings(path, config)
        fmt = "marlin" if q.get("is_marlin_format") else (
            q.get("checkpoint_format") or q.get("format") or V1)
        if fmt not in (V1, V2):
            raise FormatError(f"{path}: GPTQ checkpoint format {fmt!r} is not supported; only "
                              f"{V1!r} (v1) and {V2!r}")
        bits = int(setting(q, path, "bits", "w_bit"))
        if bits not in BITS:
            raise FormatError(f"{path}: GPTQ {bits}-bit is not supported; only 2, 3, 4 and 8")
        group_size = int(setting(q, path, "group_size", "q_group_size"))
        sym, act_order = bool(q.get("sym", True)), bool(q.get("desc_act", False))
        quantized, plain = split_names(weights, "qweight", SUFFIXES)

        def check_parts(weights, module: str) -> None:
            for s in SUFFIXES[:3]:
                weights.shape(f"{module}.{s}")  # a missing part: KeyError naming it
            if f"{module}.g_idx" not in weights and act_order:
                raise KeyError("g_idx (desc_act is set)")

        def decode(art: Artifact, name: str) -> QuantizedTensor:
            module = module_of(name)
            with tensors_fit(module, "GPTQ"):
                check_parts(art.weights, module)
                parts = {s: art.weights.get(f"{module}.{s}") for s in SUFFIXES
                         if f"{module}.{s}" in art.weights}
                return gptq_decode(parts, bits, group_size, sym, fmt == V1,
                                   model_dtype(config, torch.float16))

        def summarize(art: Artifact, name: str) -> TensorSummary:
            module = module_of(name)
            with tensors_fit(module, "GPTQ"):
                check_parts(art.weights, module)
                return gptq_summary(art.weights, module, bits, group_size, sym, fmt == V1)

        return Artifact(path=path, format=self.name, config=config, weights=weights,
                        manifest=manifest, decode=decode, summarize=summarize,
                        quantized_names=quantized, plain_names=plain)
