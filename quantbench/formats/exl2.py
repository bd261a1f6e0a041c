"""EXL2 checkpoints as exllamav2 writes and loads them. Layout: FORMATS.md §4.

Per quantized linear ``<module>``: ``q_weight`` (codes of every group in act-order, each
column a little-endian bit string along the rows, groups one after another, unshuffled),
``q_scale`` (scale codes − 1, eight nibbles per int32 along the output columns),
``q_scale_max`` (fp16 per group), ``q_groups`` (int16 pairs: width, first ``q_weight`` row)
and ``q_invperm`` (int32); a bias stays ``<module>.bias``. Output columns are padded to a
multiple of 32 (codes ``2^(b−1)``, scale nibbles ``0xF``, as exllamav2's packer leaves them).
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator, Mapping

from quantbench.config import EXL2GridConfig, QuantizeConfig
from quantbench.errors import ConfigError, FormatError
from quantbench.formats.base import Artifact, Format, TensorSummary
from quantbench.formats.gptq import (model_dtype, module_of, quant_method, refuse_embeddings,
                                     split_names, tensors_fit)
from quantbench.formats.packing import (pack_bits_lsb_cols, pack_bits_lsb_rows,
                                        unpack_bits_lsb_cols, unpack_bits_lsb_rows)
from quantbench.lazy import torch
from quantbench.models.arch import ArchSpec
from quantbench.models.weights import LazyWeights
from quantbench.quant.exl2.grid import group_layout, total_bits
from quantbench.registry import register_format
from quantbench.tensor import QuantizedTensor

SUFFIXES = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm", "q_perm")
EXLLAMAV2_LAYOUT = "0.2.7"  # the exllamav2 version whose layout FORMATS.md §4 describes
NO_HEAD_BITS = 16           # exllamav2's head_bits for an lm_head kept in 16-bit


def exl2_encode(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """Suffix → tensor for one linear on an EXL2 mix (§4.1, §4.4)."""
    out_f, in_f = qt.shape
    layout = group_layout(qt.grid, in_f)
    pad = -out_f % 32
    perm = qt.perm.long()
    rows_codes = qt.codes[:, perm].t()                       # [in, out], processing order
    packed, groups, row, qrow = [], [], 0, 0
    for bits, rows in layout:
        block = rows_codes[row:row + rows]
        if pad:
            block = torch.cat([block, block.new_full((rows, pad), 1 << (bits - 1))], dim=1)
        words = pack_bits_lsb_cols(block, bits)
        packed.append(words)
        groups += [bits, qrow]
        row, qrow = row + rows, qrow + words.shape[0]
    nibbles = (qt.scales.to(torch.int64) - 1).t()               # [G, out]
    if pad:
        nibbles = torch.cat([nibbles, nibbles.new_full((nibbles.shape[0], pad), 15)], dim=1)
    return {
        "q_weight": torch.cat(packed, dim=0),
        "q_scale": pack_bits_lsb_rows(nibbles, 4),
        "q_scale_max": qt.aux["q_scale_max"].to(torch.float16).contiguous(),
        "q_groups": torch.tensor(groups, dtype=torch.int16),
        "q_invperm": torch.argsort(perm).to(torch.int32),
    }


def read_groups(q_groups: list[int], in_features: int, qrows_total: int
                ) -> list[tuple[int, int]]:
    """``(bits, rows)`` per group from the values of ``q_groups`` (rows from the next group's
    first ``q_weight`` row, the last group takes what is left), checked against §4.3/§4.4."""
    if len(q_groups) % 2:
        raise ValueError(f"q_groups holds {len(q_groups)} values, not (width, row) pairs")
    pairs = [list(pair) for pair in zip(q_groups[0::2], q_groups[1::2])]
    if not pairs:
        raise ValueError("q_groups is empty")
    layout, covered = [], 0
    for i, (bits, qrow) in enumerate(pairs):
        if bits not in (8, 6, 5, 4, 3, 2):
            raise ValueError(f"group {i} has width {bits}")
        end = pairs[i + 1][1] if i + 1 < len(pairs) else qrows_total
        if i + 1 < len(pairs):
            if (end - qrow) * 32 % bits:
                raise ValueError(f"group {i}: {end - qrow} q_weight rows do not hold whole "
                                 f"{bits}-bit rows")
            rows = (end - qrow) * 32 // bits
        else:
            rows = in_features - covered
            if rows <= 0 or -(-rows * bits // 32) != end - qrow:
                raise ValueError(f"the last group does not fit q_weight ({qrows_total} rows)")
        if rows <= 0:
            raise ValueError(f"group {i} is empty")
        layout.append((bits, rows))
        covered += rows
    widths = [b for b, _ in layout]
    if widths != sorted(widths, reverse=True):
        raise ValueError(f"group widths {widths} are not in descending order")
    return layout


def mix_of(layout: list[tuple[int, int]], in_features: int) -> EXL2GridConfig:
    """A mix whose layout is ``layout`` (for files without a quantbench manifest): per width
    the size of its first group, and a proportion half a group short of the rows it covers
    (the last width takes the rest), so exllamav2's ceil arithmetic gives back these groups."""
    widths: list[int] = []
    rows: dict[int, int] = {}
    sizes: dict[int, int] = {}
    for bits, n in layout:
        if bits not in rows:
            widths.append(bits)
            sizes[bits] = n
        rows[bits] = rows.get(bits, 0) + n
    props = [(rows[b] - sizes[b] / 2) / in_features for b in widths[:-1]]
    props.append(1.0 - sum(props))
    grid = EXL2GridConfig(tuple(widths), tuple(props), tuple(sizes[b] for b in widths))
    if group_layout(grid, in_features) != layout:
        raise ValueError("its groups are not one exllamav2 mix (equal groups per width)")
    return grid


def exl2_decode(parts: Mapping[str, torch.Tensor], out_features: int,
                grid: EXL2GridConfig | None = None,
                dtype: torch.dtype | None = None) -> QuantizedTensor:
    """Inverse of :func:`exl2_encode`; ``grid`` is the mix when known (our manifest), else
    one is derived from ``q_groups``."""
    dtype = dtype or torch.float16
    invperm = parts["q_invperm"].to(torch.int64)
    in_f = invperm.numel()
    q_weight = parts["q_weight"]
    layout = read_groups(parts["q_groups"].to(torch.int64).reshape(-1).tolist(), in_f,
                         q_weight.shape[0])
    out_pad = q_weight.shape[1]
    if out_pad % 32 or not out_pad - 32 < out_features <= out_pad:
        raise ValueError(f"q_weight has {out_pad} columns, not {out_features} padded to 32")
    rows_codes, qrow = [], 0
    for bits, rows in layout:
        n_words = -(-rows * bits // 32)
        rows_codes.append(unpack_bits_lsb_cols(q_weight[qrow:qrow + n_words], bits, rows))
        qrow += n_words
    perm = torch.argsort(invperm)
    if not torch.equal(torch.sort(perm).values, torch.arange(in_f)):
        raise ValueError("q_invperm is not a permutation")
    codes = torch.empty(out_features, in_f, dtype=torch.uint8)
    codes[:, perm] = torch.cat(rows_codes, dim=0)[:, :out_features].t()
    nibbles = unpack_bits_lsb_rows(parts["q_scale"], 4, out_pad)[:, :out_features]
    if nibbles.shape[0] != len(layout) or parts["q_scale_max"].numel() != len(layout):
        raise ValueError(f"q_scale/q_scale_max do not have one row per group ({len(layout)})")
    if grid is None:
        grid = mix_of(layout, in_f)
    elif group_layout(grid, in_f) != layout:
        raise ValueError(f"q_groups do not match the recorded mix {grid.desc}")
    return QuantizedTensor(codes=codes, scales=(nibbles + 1).t().contiguous(), zeros=None,
                           grid=grid, dtype=dtype, perm=perm.to(torch.int32),
                           aux={"q_scale_max": parts["q_scale_max"].to(torch.float16)})


def exl2_summary(weights, module: str, out_features: int,
                 grid: EXL2GridConfig | None = None) -> TensorSummary:
    """What :func:`exl2_decode` gives for ``module``, from the headers and ``q_groups``."""
    in_f = math.prod(weights.shape(f"{module}.q_invperm"))
    q_rows, out_pad = weights.shape(f"{module}.q_weight")
    layout = read_groups(weights.ints(f"{module}.q_groups"), in_f, q_rows)
    if out_pad % 32 or not out_pad - 32 < out_features <= out_pad:
        raise ValueError(f"q_weight has {out_pad} columns, not {out_features} padded to 32")
    if weights.shape(f"{module}.q_scale")[0] != len(layout) \
            or math.prod(weights.shape(f"{module}.q_scale_max")) != len(layout):
        raise ValueError(f"q_scale/q_scale_max do not have one row per group ({len(layout)})")
    if grid is None:
        grid = mix_of(layout, in_f)
    elif group_layout(grid, in_f) != layout:
        raise ValueError(f"q_groups do not match the recorded mix {grid.desc}")
    return TensorSummary((out_features, in_f), grid, total_bits(grid, in_f, out_features))


def _manifest_tensor(manifest: dict[str, Any] | None, name: str) -> dict[str, Any]:
    return ((manifest or {}).get("tensors") or {}).get(name) or {}


def _recorded_grid(info: dict[str, Any]) -> EXL2GridConfig | None:
    desc = str(info.get("grid", ""))
    return EXL2GridConfig.from_desc(desc[len("EXL2 "):]) if desc.startswith("EXL2 ") else None


@register_format("exl2")
class EXL2Format(Format):
    description = "EXL2: mixed bit widths per layer and group (exllamav2)"

    def check(self, config: QuantizeConfig, model: Any, targets: list[str]) -> None:
        if config.grid.kind != "exl2":
            raise ConfigError(f"exl2 stores EXL2 mixes, not {config.grid.describe()}; use "
                              "--method exl2 --bpw 4.65 (or --bits 4 for one width)")
        refuse_embeddings("EXL2", model, targets)
        if f"{model.arch.lm_head}.weight" in targets:
            raise ConfigError("quantbench's EXL2 writer keeps lm_head in 16-bit (head_bits "
                              "16); drop --quantize-lm-head")
        for name in targets:
            out_f, in_f = model.weights.shape(name)[:2]
            config.grid.check_shape(name, out_f, in_f)

    def quantization_config(self, config: QuantizeConfig, targets: list[str],
                            arch: ArchSpec) -> dict[str, Any]:
        """exllamav2's ``compile.py`` signature (§4.5); the loader itself does not need it."""
        from quantbench import __version__
        from quantbench.calibration.data import BUNDLED_C4

        o = config.options
        return {"quant_method": "exl2", "version": EXLLAMAV2_LAYOUT,
                "bits": config.grid.bits, "head_bits": NO_HEAD_BITS,
                "calibration": {"rows": o.calib_samples, "length": o.calib_len,
                                "dataset": Path(o.calib_data or BUNDLED_C4).name},
                "quantizer": f"quantbench:{__version__}"}

    def encode(self, name: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        module = module_of(name)
        return {f"{module}.{k}": v for k, v in exl2_encode(qt).items()}

    @classmethod
    def detect(cls, config: dict[str, Any], weights: LazyWeights) -> bool:
        """exllamav2 detects EXL2 by the tensor names; a file it compiled also says so."""
        return quant_method(config, weights) == "exl2" or any(
            n.endswith(".q_weight") for n in weights.names())

    def read(self, path: Path, config: dict[str, Any], weights: LazyWeights,
             manifest: dict[str, Any] | None) -> Artifact:
        quantized, plain = split_names(weights, "q_weight", SUFFIXES)

        def out_features(art: Artifact, module: str, info: dict[str, Any]) -> int:
            for s in SUFFIXES[:5]:
                art.weights.shape(f"{module}.{s}")  # a missing part: KeyError naming it
            out_f = (info.get("shape") or [None])[0]
            if out_f is None:
                bias = f"{module}.bias"
                out_f = art.weights.shape(bias)[0] if bias in art.weights else \
                    art.weights.shape(f"{module}.q_weight")[1]
            return int(out_f)

        def decode(art: Artifact, name: str) -> QuantizedTensor:
            module, info = module_of(name), _manifest_tensor(art.manifest, name)
            with _tensors_fit(module):
                out_f = out_features(art, module, info)
                parts = {s: art.weights.get(f"{module}.{s}") for s in SUFFIXES[:5]}
                return exl2_decode(parts, out_f, _recorded_grid(info),
                                   model_dtype(config, torch.float16))

        def summarize(art: Artifact, name: str) -> TensorSummary:
            module, info = module_of(name), _manifest_tensor(art.manifest, name)
            with _tensors_fit(module):
                return exl2_summary(art.weights, module, out_features(art, module, info),
                                    _recorded_grid(info))

        return Artifact(path=path, format=self.name, config=config, weights=weights,
                        manifest=manifest, decode=decode, summarize=summarize,
                        quantized_names=quantized, plain_names=plain)


@contextlib.contextmanager
def _tensors_fit(module: str) -> Iterator[None]:
    """``tensors_fit`` (formats/gptq.py), with a mix that is no EXL2 mix as a misfit too."""
    with tensors_fit(module, "EXL2"):
        try:
            yield
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
