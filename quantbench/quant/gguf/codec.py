"""GGUF block codecs: the contract every ggml type implements, and their registry.

A codec works on rows already cut into blocks: ``x`` is a float32 tensor ``[n_blocks,
block_size]`` (a row of ``ne[0]`` elements is ``ne[0] / block_size`` consecutive blocks) and the
encoded form is a uint8 tensor ``[n_blocks, type_size]`` holding ggml's block structs byte for
byte (``ggml-common.h``), so a whole tensor's data is ``blocks.reshape(-1)`` in row order.

``importance`` (optional, ``[n_blocks, block_size]`` float32, non-negative) is llama.cpp's
imatrix slice for each block's columns (``quant_weights``): with it a codec follows
``quantize_row_<type>_impl``; without it, ``quantize_row_<type>_ref``. Both are meant to be bit
for bit what ``ggml_quantize_chunk`` writes for the same float32 input.

Pure tensor maths, vectorised over blocks; no files, no state.
"""
from __future__ import annotations

from typing import ClassVar, TypeVar

import torch

from quantbench.errors import ConfigError

T = TypeVar("T")

_CODECS: dict[str, "BlockCodec"] = {}


class BlockCodec:
    """One ggml tensor type. Subclasses set the class attributes and the two methods."""

    name: ClassVar[str] = ""        # ggml name: "Q4_K"
    type_id: ClassVar[int] = -1     # GGMLQuantizationType value
    block_size: ClassVar[int] = 1   # elements per block
    type_size: ClassVar[int] = 4    # bytes per block

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def quantize(self, x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """``[n_blocks, block_size]`` float32 → ``[n_blocks, type_size]`` uint8."""
        raise NotImplementedError

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        """``[n_blocks, type_size]`` uint8 → ``[n_blocks, block_size]`` float32."""
        raise NotImplementedError

    # Whole rows, as tensors are stored: ``[rows, ne0]`` ↔ ``[rows, ne0 // block * type_size]``.
    def quantize_rows(self, w: torch.Tensor, importance: torch.Tensor | None = None
                      ) -> torch.Tensor:
        rows, cols = w.shape
        self.check_row(cols)
        x = w.float().reshape(-1, self.block_size)
        imp = None
        if importance is not None:
            imp = importance.float().reshape(1, cols).expand(rows, cols).reshape(
                -1, self.block_size)
        return self.quantize(x, imp).reshape(rows, -1)

    def dequantize_rows(self, data: torch.Tensor, cols: int) -> torch.Tensor:
        self.check_row(cols)
        rows = data.numel() // (cols // self.block_size * self.type_size)
        return self.dequantize(data.reshape(-1, self.type_size)).reshape(rows, cols)

    def check_row(self, cols: int) -> None:
        if cols % self.block_size:
            raise ConfigError(f"{self.name} needs rows that are a multiple of {self.block_size} "
                              f"elements, got {cols}")


def register_codec(cls: type[T]) -> type[T]:
    codec = cls()
    if codec.name in _CODECS and type(_CODECS[codec.name]) is not cls:
        raise ValueError(f"GGUF type {codec.name} is already registered")
    _CODECS[codec.name] = codec
    return cls


def _ensure_builtins() -> None:
    import quantbench.quant.gguf.kquants  # noqa: F401
    import quantbench.quant.gguf.legacy  # noqa: F401


def get_codec(name: str) -> BlockCodec:
    _ensure_builtins()
    key = str(name).upper()
    if key not in _CODECS:
        raise ConfigError(f"unknown GGUF tensor type {name!r}; known: {', '.join(codec_names())}")
    return _CODECS[key]


def codec_for_id(type_id: int) -> BlockCodec | None:
    _ensure_builtins()
    return next((c for c in _CODECS.values() if c.type_id == type_id), None)


def codec_names() -> list[str]:
    _ensure_builtins()
    return sorted(_CODECS)

