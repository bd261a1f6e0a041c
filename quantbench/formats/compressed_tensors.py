"""``compressed-tensors`` ``pack-quantized``: what llm-compressor writes and vLLM / transformers
(with the compressed-tensors package) load. Layout: FORMATS.md §6."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from quantbench.config import IntGridConfig, QuantizeConfig
from quantbench.errors import ConfigError, FormatError
from quantbench.formats.base import Artifact, Format, TensorSummary, require_int_grid
from quantbench.formats.packing import (pack_bits_lsb_cols, pack_bits_lsb_rows,
                                        unpack_bits_lsb_cols, unpack_bits_lsb_rows)
from quantbench.lazy import torch
from quantbench.models.arch import ArchSpec
from quantbench.models.weights import LazyWeights
from quantbench.quant.grids.base import check_scale_shape, count_bits
from quantbench.registry import register_format
from quantbench.tensor import QuantizedTensor

SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
STRATEGY = {"tensor": "tensor", "channel": "channel", "group": "group"}


def _module(weight_name: str) -> str:
    return weight_name[: -len(".weight")]


def _suggest_group(in_features: set[int], wanted: int) -> int:
    """Largest power of two <= ``wanted`` that divides every row length."""
    g = 1 << (wanted.bit_length() - 1)
    while g > 1 and any(n % g for n in in_features):
        g //= 2
    return g


def _dynamic_groups(config: QuantizeConfig) -> bool:
    """Act-order with groups formed in processing order needs a ``g_idx`` per module."""
    sweep = config.options.sweep()
    return (config.grid.granularity == "group" and sweep is not None and sweep.act_order
            and not sweep.static_groups)


@register_format("compressed-tensors")
class CompressedTensorsFormat(Format):
    description = "compressed-tensors pack-quantized (vLLM, transformers + compressed-tensors)"

    def check(self, config: QuantizeConfig, model: Any, targets: list[str]) -> None:
        require_int_grid("compressed-tensors", config)
        embed = f"{model.arch.embed}.weight"
        if embed in targets:
            raise ConfigError(
                "compressed-tensors pack-quantized stores Linear layers only; drop "
                "--quantize-embeddings (a tied lm_head is the embedding) or use --format dense")
        grid = config.grid
        if _dynamic_groups(config):
            raise ConfigError(
                "compressed-tensors 0.20 no longer loads act-order with dynamic groups (g_idx, "
                "actorder 'group'); pass --static-groups (actorder 'weight') or --no-act-order, "
                "or use --format dense")
        if grid.granularity == "group":
            widths = {model.weights.shape(name)[1] for name in targets}
            if any(n % grid.group_size for n in widths):
                raise ConfigError(
                    f"compressed-tensors needs the group size to divide every row "
                    f"({', '.join(map(str, sorted(widths)))}); use --group-size "
                    f"{_suggest_group(widths, grid.group_size)} or --format dense")

    def quantization_config(self, config: QuantizeConfig, targets: list[str],
                            arch: ArchSpec) -> dict[str, Any]:
        grid = config.grid
        weights = {
            "num_bits": grid.bits, "type": "int", "symmetric": grid.symmetric,
            "strategy": STRATEGY[grid.granularity],
            "group_size": grid.group_size if grid.granularity == "group" else None,
            "block_structure": None, "dynamic": False,
            "actorder": "weight" if (sweep := config.options.sweep()) and sweep.act_order
            else None,
            "observer": "minmax",
            "observer_kwargs": {},
        }
        modules = [arch.output_name(_module(t)) for t in targets]
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": [f"re:^{re.escape(m)}$" for m in modules],
                "weights": weights, "input_activations": None, "output_activations": None,
                "format": "pack-quantized",
            }},
            "ignore": [],
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "version": "0.20.0",
        }

    def encode(self, name: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        module = _module(name)
        out_f, in_f = qt.shape
        scales = qt.scales.reshape(1) if qt.grid.granularity == "tensor" else qt.scales
        tensors = {
            f"{module}.weight_packed": pack_bits_lsb_rows(qt.codes, qt.grid.bits),
            f"{module}.weight_scale": scales.to(qt.dtype).contiguous(),
            f"{module}.weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
        }
        if qt.zeros is not None:
            if qt.grid.granularity == "tensor":
                zp = (qt.zeros.reshape(1) - qt.grid.sym_zero).to(torch.int8)
            else:
                zp = pack_bits_lsb_cols(qt.zeros.to(torch.uint8), qt.grid.bits)
            tensors[f"{module}.weight_zero_point"] = zp
        return tensors

    @classmethod
    def detect(cls, config: dict[str, Any], weights: LazyWeights) -> bool:
        q = config.get("quantization_config") or {}
        return q.get("quant_method") == "compressed-tensors"

    def read(self, path: Path, config: dict[str, Any], weights: LazyWeights,
             manifest: dict[str, Any] | None) -> Artifact:
        q = config.get("quantization_config") or {}
        if q.get("format") != "pack-quantized":
            raise FormatError(f"{path}: compressed-tensors format {q.get('format')!r} is not "
                              "supported; only pack-quantized is")
        groups = list((q.get("config_groups") or {}).values())
        if len(groups) != 1 or not groups[0].get("weights"):
            raise FormatError(f"{path}: expected one weight quantization group in config.json")
        args = groups[0]["weights"]
        grid = _grid_from_args(args, path)
        names = weights.names()
        packed = [n[: -len(".weight_packed")] for n in names if n.endswith(".weight_packed")]
        plain = [n for n in names if not n.endswith(SUFFIXES)]
        decode = lambda art, name: _decode(art.weights, _module(name), grid)  # noqa: E731
        summarize = lambda art, name: _summary(art.weights, _module(name), grid)  # noqa: E731
        return Artifact(path=path, format=self.name, config=config, weights=weights,
                        manifest=manifest, decode=decode, summarize=summarize,
                        quantized_names=[f"{m}.weight" for m in packed], plain_names=plain)


def _grid_from_args(args: dict[str, Any], path: Path) -> IntGridConfig:
    if args.get("type", "int") != "int" or args.get("strategy") not in STRATEGY:
        raise FormatError(f"{path}: weight args {args.get('type')}/{args.get('strategy')} are "
                          "not supported; only int tensor/channel/group")
    return IntGridConfig(bits=int(args["num_bits"]), symmetric=bool(args["symmetric"]),
                         granularity=args["strategy"], group_size=int(args.get("group_size") or 0))


def _summary(weights, module: str, grid: IntGridConfig) -> TensorSummary:
    """What :func:`_decode` gives for ``module``, from the headers and its ``weight_shape``."""
    try:
        out_f, in_f = weights.ints(f"{module}.weight_shape")
        rows = weights.shape(f"{module}.weight_packed")[0]
        scales = weights.shape(f"{module}.weight_scale")
    except KeyError as exc:
        raise FormatError(f"{module} lacks {exc.args[0]}; the checkpoint is incomplete") from exc
    if grid.granularity == "tensor":
        if math.prod(scales) != 1:
            raise ValueError(f"a per-tensor weight_scale holds one value, not {list(scales)}")
        scales = (1, 1)
    n_zeros = 0
    if not grid.symmetric:
        zp = weights.shape(f"{module}.weight_zero_point")
        n_zeros = 1 if grid.granularity == "tensor" else out_f * zp[1]
    has_g_idx = f"{module}.weight_g_idx" in weights
    scale_rows, groups = scales
    check_scale_shape(scale_rows, groups, rows, grid.n_groups(in_f), has_g_idx, grid.describe())
    return TensorSummary((rows, in_f), grid, count_bits(
        rows * in_f, grid.bits,
        math.prod(scales) * weights.element_bits(f"{module}.weight_scale"), n_zeros=n_zeros))


def _decode(weights: LazyWeights, module: str, grid: IntGridConfig) -> QuantizedTensor:
    try:
        out_f, in_f = (int(v) for v in weights.get(f"{module}.weight_shape"))
        codes = unpack_bits_lsb_rows(weights.get(f"{module}.weight_packed"), grid.bits, in_f)
        scales = weights.get(f"{module}.weight_scale")
    except KeyError as exc:
        raise FormatError(f"{module} lacks {exc.args[0]}; the checkpoint is incomplete") from exc
    scales = scales.reshape(1, 1) if grid.granularity == "tensor" else scales
    zeros = None
    if not grid.symmetric:
        zp = weights.get(f"{module}.weight_zero_point")
        if grid.granularity == "tensor":
            zeros = (zp.to(torch.int32) + grid.sym_zero).reshape(1, 1)
        else:
            zeros = unpack_bits_lsb_cols(zp, grid.bits, out_f).to(torch.int32)
    g_idx_name = f"{module}.weight_g_idx"
    g_idx = weights.get(g_idx_name).to(torch.int32) if g_idx_name in weights else None
    return QuantizedTensor(codes=codes, scales=scales, zeros=zeros, grid=grid, dtype=scales.dtype,
                           g_idx=g_idx)
