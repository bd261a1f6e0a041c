"""AWQ GEMM checkpoints as AutoAWQ writes them and transformers (gptqmodel) and vLLM load them.
Layout: FORMATS.md §2.2; config keys §2.4."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from quantbench.config import IntGridConfig, QuantizeConfig
from quantbench.errors import ConfigError, FormatError
from quantbench.formats.base import Artifact, TensorSummary, require_int_grid
from quantbench.formats.compressed_tensors import _dynamic_groups, _suggest_group
from quantbench.formats.gptq import (ModuleTensorsFormat, fp16_scales, model_dtype, module_of,
                                     quant_settings, refuse_embeddings, setting, split_names,
                                     tensors_fit, untargeted_modules)
from quantbench.formats.packing import pack_awq_cols, unpack_awq_cols
from quantbench.lazy import torch
from quantbench.models.arch import ArchSpec
from quantbench.models.weights import LazyWeights
from quantbench.quant.grid import group_index
from quantbench.quant.grids.base import check_scale_shape, count_bits
from quantbench.registry import register_format
from quantbench.tensor import QuantizedTensor

SUFFIXES = ("qweight", "qzeros", "scales")


def awq_encode(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """Suffix → tensor: qweight ``[in, out/8]``, qzeros ``[in/g, out/8]`` (both interleaved
    along the output dim), scales ``[in/g, out]`` fp16."""
    if qt.zeros is None or qt.grid.bits != 4:
        raise ConfigError(f"AWQ stores 4-bit zero-point grids only, not {qt.grid.describe()}; "
                          "use --bits 4 --zero-point")
    if not torch.equal(qt.group_index(), group_index(qt.shape[1], qt.grid)):
        raise ConfigError("AWQ has no g_idx for act-order groups; pass --static-groups or "
                          "--no-act-order, or use --format gptq")
    return {
        "qweight": pack_awq_cols(qt.codes.t().contiguous()),
        "qzeros": pack_awq_cols(qt.zeros.t().contiguous()),
        "scales": fp16_scales(qt, "AWQ").t().contiguous(),
    }


def awq_decode(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int, dtype: torch.dtype | None = None) -> QuantizedTensor:
    """Inverse of ``awq_encode``: zeros are stored as they are (no −1 offset, §2.1)."""
    dtype = dtype or torch.float16
    grid = IntGridConfig.from_group_size(4, group_size if group_size > 0 else -1, False)
    return QuantizedTensor(codes=unpack_awq_cols(qweight).t().contiguous(),
                           scales=scales.t().contiguous(),
                           zeros=unpack_awq_cols(qzeros).to(torch.int32).t().contiguous(),
                           grid=grid, dtype=dtype)


def awq_summary(weights, module: str, group_size: int) -> TensorSummary:
    """What :func:`awq_decode` gives for ``module``, from the headers alone."""
    in_f, out_f = weights.shape(f"{module}.qweight")[0], weights.shape(f"{module}.qweight")[1] * 8
    grid = IntGridConfig.from_group_size(4, group_size if group_size > 0 else -1, False)
    scales = weights.shape(f"{module}.scales")  # [groups, out]; decoded transposed
    check_scale_shape(scales[1], scales[0], out_f, grid.n_groups(in_f), False, grid.describe())
    qzeros = weights.shape(f"{module}.qzeros")
    return TensorSummary((out_f, in_f), grid, count_bits(
        out_f * in_f, 4, math.prod(scales) * weights.element_bits(f"{module}.scales"),
        n_zeros=qzeros[0] * qzeros[1] * 8))


@register_format("awq")
class AWQFormat(ModuleTensorsFormat):
    description = "AWQ GEMM, 4-bit zero-point (transformers + gptqmodel, vLLM)"
    method_key = "awq"
    codec = staticmethod(awq_encode)

    def check(self, config: QuantizeConfig, model: Any, targets: list[str]) -> None:
        require_int_grid("AWQ", config)
        refuse_embeddings("AWQ", model, targets)
        grid = config.grid
        if grid.bits != 4:
            raise ConfigError(f"AWQ stores 4-bit codes only, not {grid.bits}-bit; use --bits 4 "
                              "or --format gptq")
        if grid.symmetric:
            raise ConfigError("AWQ GEMM stores zero points (asymmetric grid); use --zero-point "
                              "(e.g. --method zeropoint) or --format gptq")
        if grid.granularity != "group":
            raise ConfigError(f"AWQ stores per-group scales, not {grid.describe()}; use "
                              "--group-size 128, 64 or 32")
        if _dynamic_groups(config):
            raise ConfigError("AWQ has no g_idx for act-order groups; pass --static-groups or "
                              "--no-act-order, or use --format gptq")
        shapes = [tuple(model.weights.shape(name)[:2]) for name in targets]
        widths = {in_f for _, in_f in shapes}
        if any(n % grid.group_size for n in widths):
            raise ConfigError(
                f"AWQ needs the group size to divide every row "
                f"({', '.join(map(str, sorted(widths)))}); use --group-size "
                f"{_suggest_group(widths, grid.group_size)} or --format gptq")
        for name, (out_f, in_f) in zip(targets, shapes):
            if out_f % 8:
                raise ConfigError(f"AWQ packs 8 output channels per int32 word; {name} has "
                                  f"{out_f}; use --format gptq or compressed-tensors")

    def quantization_config(self, config: QuantizeConfig, targets: list[str],
                            arch: ArchSpec) -> dict[str, Any]:
        """AutoAWQ ``to_transformers_dict`` keys (§2.4), plus GPTQModel's ``dynamic`` skip rules
        when modules stay unquantized: ``GPTQModel.load`` ignores ``modules_to_not_convert``
        (7.6.0) and would run those modules as empty quantized linears."""
        skipped = untargeted_modules(targets, arch, stored=False)
        q: dict[str, Any] = {"quant_method": "awq", "zero_point": True,
                             "group_size": config.grid.group_size, "bits": 4, "version": "gemm",
                             "modules_to_not_convert": skipped or None}
        if skipped:  # GPTQModel "dynamic": a "-:" pattern leaves the module unquantized
            q["dynamic"] = {f"-:^{re.escape(m)}$": {} for m in skipped}
        return q

    def read(self, path: Path, config: dict[str, Any], weights: LazyWeights,
             manifest: dict[str, Any] | None) -> Artifact:
        q = quant_settings(path, config)
        version = str(q.get("version") or q.get("format") or "gemm").lower()
        if version != "gemm":
            raise FormatError(f"{path}: AWQ version {version!r} is not supported; only 'gemm'")
        bits = int(setting(q, path, "bits", "w_bit"))
        if bits != 4 or not q.get("zero_point", True):
            raise FormatError(f"{path}: AWQ {bits}-bit zero_point={q.get('zero_point')} is not "
                              "supported; only 4-bit with zero points")
        group_size = int(setting(q, path, "group_size", "q_group_size"))
        quantized, plain = split_names(weights, "qweight", SUFFIXES)

        def decode(art: Artifact, name: str) -> QuantizedTensor:
            module = module_of(name)
            with tensors_fit(module, "AWQ"):
                parts = [art.weights.get(f"{module}.{s}") for s in SUFFIXES]
                return awq_decode(*parts, group_size=group_size,
                                  dtype=model_dtype(config, torch.float16))

        def summarize(art: Artifact, name: str) -> TensorSummary:
            module = module_of(name)
            with tensors_fit(module, "AWQ"):
                for s in SUFFIXES:
                    art.weights.shape(f"{module}.{s}")  # a missing part: KeyError naming it
                return awq_summary(art.weights, module, group_size)

        return Artifact(path=path, format=self.name, config=config, weights=weights,
                        manifest=manifest, decode=decode, summarize=summarize,
                        quantized_names=quantized, plain_names=plain)
