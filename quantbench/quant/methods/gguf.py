"""Methods on GGUF grids: ``rtn`` (llama.cpp's reference quantizers, data-free) and ``imatrix``
(importance from the calibration layer, or from a llama.cpp imatrix file, weighting the scale/min
search as llama.cpp's ``--imatrix`` does). A run's grid names a mixture (``Q4_K_M``); ``prepare``
resolves it to one ggml type per tensor with llama.cpp's rules, and each tensor is quantized with
that type's codec.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantbench.config import (CalibrationOptions, GGUFGridConfig, GridConfig, IntGridConfig,
                               MethodOptions, QuantizeConfig)
from quantbench.errors import ConfigError
from quantbench.lazy import torch
from quantbench.options import cli_flag, option
from quantbench.quant.methods.base import Method
from quantbench.registry import register_method
from quantbench.tensor import QuantizedTensor

log = logging.getLogger(__name__)


class GGUFPlan:
    """Mixin for any method that can target GGUF: the per-tensor grids a run's grid plans
    (a GGUF mixture: one ggml type per tensor by llama.cpp's rules; other grids plan none and
    every tensor takes the run's grid) and one tensor's round-to-nearest fit on its grid
    (llama.cpp's RTN / imatrix quantizers on GGUF types)."""

    config: QuantizeConfig
    needs_calibration: bool

    @property
    def has_imatrix(self) -> bool:
        """Whether llama.cpp's type rules see an importance matrix (they differ for Q4_0/Q5_0)."""
        return self.needs_calibration

    def __init__(self, config: QuantizeConfig):
        super().__init__(config)
        self.planned: dict[str, GridConfig] = {}

    def prepare(self, model, targets: list[str]) -> None:
        """The run grid's per-tensor plan (a GGUF mixture: llama.cpp's rules)."""
        self.planned = self.config.grid.plan(model, targets, has_imatrix=self.has_imatrix)

    @property
    def types(self) -> dict[str, str]:
        """Planned ggml type names by tensor (empty unless the run's grid is a GGUF mixture)."""
        return {name: grid.type for name, grid in self.planned.items()}

    def grid_for(self, name: str) -> GridConfig:
        """The grid tensor ``name`` is quantized onto: its planned one, or the run's grid
        when the run's grid plans none."""
        if not self.planned:
            return self.config.grid
        if name not in self.planned:
            raise ConfigError(f"{name} has no {self.config.grid.describe()} type in this run's "
                              "plan")
        return self.planned[name]

    def tensor_types(self) -> dict[str, str]:
        return self.types

    def tensor_type(self, name: str) -> str:
        if name not in self.planned:
            raise ConfigError(f"{name} has no GGUF type in this run's plan")
        return self.planned[name].type

    def quantize_gguf(self, name: str, weight: torch.Tensor,
                      importance: torch.Tensor | None = None) -> QuantizedTensor:
        """Round-to-nearest onto the tensor's planned grid (``importance`` where it weighs
        one)."""
        return self.grid_for(name).rtn(weight, importance=importance)


def gguf_tensor(data: torch.Tensor, ggml_type: str, dtype: torch.dtype) -> QuantizedTensor:
    """A tensor's ggml block bytes ``[rows, row_bytes]`` as a ``QuantizedTensor``."""
    return GGUFGridConfig(ggml_type).tensor(data, dtype)


class _GGUFMethod(GGUFPlan, Method):
    """Shared by the GGUF-native methods: the per-tensor type plan and one tensor's
    quantization."""

    native_format = "gguf"
    gguf_capable = True


@register_method("rtn")
class RTN(_GGUFMethod):
    description = ("round-to-nearest with the grid's own fit: llama.cpp's reference quantizers "
                   "on GGUF types, min/max scales on integer grids")
    options_cls = MethodOptions
    device_capable = True  # as a transform's inner method: rounds where the block is

    @classmethod
    def make_grid(cls, bits: int, group_size: int, symmetric: bool | None,
                  options: MethodOptions) -> GridConfig:
        if group_size == 0:
            group_size = 128
        return IntGridConfig.from_group_size(bits, group_size, bool(symmetric) if symmetric
                                             is not None else False)

    def quantize_weight(self, name: str, weight: torch.Tensor) -> QuantizedTensor:
        return self.grid_for(name).rtn(weight)


@dataclass(frozen=True)
class ImatrixOptions(CalibrationOptions):
    calib_samples: int = 64
    imatrix_file: str | None = option(None, flag="--imatrix", help=(
        "A llama.cpp imatrix file (llama-imatrix's .gguf or legacy .dat) instead of "
        "calibration; implies --method imatrix."))


IMATRIX_FILE = "imatrix.gguf"  # beside model.gguf: the importance a calibrated run used
# the options that choose calibration windows, which an imatrix file replaces
_CALIBRATION_FIELDS = ("calib_samples", "calib_len", "calib_seed", "calib_data",
                       "calib_chat_template")


@register_method("imatrix")
class Imatrix(_GGUFMethod):
    """Importance-weighted GGUF quantization. Calibrated, each block linear's importance comes
    from the pipeline (sums of x² and rows, as llama-imatrix records them) and is written beside
    the GGUF as ``imatrix.gguf`` (``llama-quantize --imatrix`` on it gives the same tensors).
    With ``imatrix_file`` every tensor takes its own entry of that file, as llama-quantize does,
    and no calibration runs."""

    description = ("llama.cpp's importance-weighted scale/min search, importance (mean x² per "
                   "input column) from the calibration layer or a llama.cpp imatrix file")
    options_cls = ImatrixOptions
    needs_calibration = True
    statistic = "imatrix"

    def __init__(self, config: QuantizeConfig):
        from quantbench.calibration.imatrix_file import load_imatrix

        super().__init__(config)
        path = config.options.imatrix_file
        self.loaded = load_imatrix(path) if path else None
        self.needs_calibration = self.loaded is None  # a file replaces the calibration pass
        self.importance: dict[str, torch.Tensor] = {}  # HF name → importance, from the file
        self.collected: dict[str, Any] = {}            # HF name → ImatrixEntry, calibrated
        self.gguf_names: dict[str, str] = {}
        self.block_targets: list[str] = []
        self.arch = None

    @property
    def has_imatrix(self) -> bool:
        return True

    @classmethod
    def check(cls, config: QuantizeConfig) -> None:
        if not config.grid.weighs_importance:
            raise ConfigError("imatrix weights GGUF block searches; pass --format gguf "
                              "--type Q4_K_M (or another GGUF type)")
        o = config.options
        if o.imatrix_file:
            default = ImatrixOptions(imatrix_file=o.imatrix_file)
            for f in dataclasses.fields(ImatrixOptions):
                if f.name in _CALIBRATION_FIELDS and getattr(o, f.name) != getattr(default,
                                                                                   f.name):
                    raise ConfigError(f"--imatrix {o.imatrix_file} replaces calibration; drop "
                                      f"{cli_flag(ImatrixOptions, f)}")

    def prepare(self, model, targets: list[str]) -> None:
        from quantbench.calibration.imatrix_file import importance_for_model
        from quantbench.formats.gguf_kv import gguf_tensor_name

        super().prepare(model, targets)
        self.arch = model.arch
        self.gguf_names = {n: gguf_tensor_name(model.arch, n) for n in targets}
        self.block_targets = [n for n in targets if model.arch.block_of(n) is not None]
        if self.loaded is not None:
            self.importance = importance_for_model(self.loaded, model, targets)

    def quantize_weight(self, name: str, weight: torch.Tensor) -> QuantizedTensor:
        # Calibrated, embeddings and lm_head are quantized before the blocks, without
        # importance (llama-imatrix collects output.weight only with --process-output).
        return self.quantize_gguf(name, weight, self.importance.get(name))

    def quantize_with_stats(self, name: str, weight: torch.Tensor,
                            stat: tuple[torch.Tensor, int]) -> QuantizedTensor:
        from quantbench.calibration.imatrix_file import ImatrixEntry

        entry = ImatrixEntry.of(stat[0].cpu(), stat[1])
        self.collected[name] = entry  # (an expert's: a row of its stacked tensor's entry)
        return self.quantize_gguf(name, weight, entry.importance())

    def _dataset(self) -> str:
        from quantbench.calibration.data import BUNDLED_C4

        return self.config.options.calib_data or BUNDLED_C4

    def gguf_metadata(self) -> list[tuple[str, Any, str]]:
        """The ``quantize.imatrix.*`` keys llama-quantize adds to a file it quantized with an
        imatrix (``(key, value, gguf value type name)``); calibrated, the file named is the
        ``imatrix.gguf`` written beside the model."""
        if self.loaded is not None:
            kvs = [("quantize.imatrix.file", _c_string(self.config.options.imatrix_file),
                    "STRING")]
            if self.loaded.datasets:
                kvs.append(("quantize.imatrix.dataset", _c_string(self.loaded.datasets[0]),
                            "STRING"))
            kvs.append(("quantize.imatrix.entries_count", len(self.loaded.entries), "UINT32"))
            chunks = self.loaded.chunk_count
        else:
            entries = {self.gguf_names[n] for n in self.block_targets}  # (experts share one)
            kvs = [("quantize.imatrix.file", IMATRIX_FILE, "STRING"),
                   ("quantize.imatrix.dataset", _c_string(self._dataset()), "STRING"),
                   ("quantize.imatrix.entries_count", len(entries), "UINT32")]
            chunks = self.config.options.calib_samples
        if chunks > 0:
            kvs.append(("quantize.imatrix.chunks_count", chunks, "UINT32"))
        return kvs

    def side_files(self, directory: Path) -> list[str]:
        """Calibrated: the importance this run used, as llama.cpp's imatrix GGUF."""
        from quantbench.calibration.imatrix_file import gguf_entries, write_imatrix

        if self.loaded is not None:
            return []
        if set(self.collected) != set(self.block_targets):
            raise ConfigError(f"imatrix: statistics for {len(self.collected)} of "
                              f"{len(self.block_targets)} block linears; the pipeline skipped "
                              "some")
        o = self.config.options
        write_imatrix(Path(directory) / IMATRIX_FILE, gguf_entries(self.collected, self.arch),
                      datasets=[self._dataset()], chunk_count=o.calib_samples,
                      chunk_size=o.calib_len)
        return [IMATRIX_FILE]


def _c_string(text: str) -> str:
    """What llama-quantize keeps of a string metadata value (a 128-byte C buffer)."""
    return text.encode("utf-8")[:127].decode("utf-8", "ignore")
