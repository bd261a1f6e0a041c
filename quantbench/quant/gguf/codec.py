"""GGUF block codecs: the contract every ggml type implements, and their registry.

A codec works on rows already cut into blocks: ``x`` is a float32 tensor ``[n_blocks,
block_size]`` (a row of ``ne[0]`` elements is ``ne[0] / block_size`` consecutive blocks) and the
encoded form is a uint8 tensor ``[n_blocks, type_size]`` holding ggml's block structs byte for
byte (``ggml-common.h``), so a whole tensor's data is ``blocks.reshape(-1)`` in row order.

``importance`` (optional, ``[n_blocks, block_size]`` float32, non-negative) is llama.cpp's
imatrix slice for each block's columns (``quant_weights``): with it a codec follows
``quantize_row_<type>_impl``; without it, ``quantize_row_<type>_ref``. Both are meant to be bit
for bit what ``ggml_quantize_chunk`` writes for the same float32 input.

Pure tensor maths, vectorised over blocks; no files, no state. :meth:`BlockCodec.quantize_rows`
cuts a tensor into row chunks of about :attr:`BlockCodec.chunk_elements` values (so the
searches' temporaries stay a few MB however large the tensor) and runs the chunks on
:func:`run_chunks`'s worker threads, one chunk per thread, each with single-threaded torch ops:
the codecs issue many small tensor ops, and torch's own intra-op threads (OpenMP) synchronise
at every one of them, which costs far more than it gains (tens of times more when the cores
are shared with other processes).

The registry is a leaf table: the built-in codecs (``kquants``, ``kquants_low``, ``legacy``)
register here with :func:`register_codec` when imported; ``quantbench/builtins.py`` declares
a loader that imports them, run on the first lookup of a type not registered yet.
"""
from __future__ import annotations

from typing import Callable, ClassVar, TypeVar

from quantbench.errors import ConfigError
from quantbench.lazy import torch
from quantbench.threads import run_chunks

T = TypeVar("T")

_CODECS: dict[str, "BlockCodec"] = {}
_LOAD: list[Callable[[], None]] = []  # imports (registers) the built-ins, run once on a miss


class BlockCodec:
    """One ggml tensor type. Subclasses set the class attributes and the two methods."""

    name: ClassVar[str] = ""        # ggml name: "Q4_K"
    type_id: ClassVar[int] = -1     # GGMLQuantizationType value
    block_size: ClassVar[int] = 1   # elements per block
    type_size: ClassVar[int] = 4    # bytes per block
    chunk_elements: ClassVar[int] = 1 << 18  # values per row chunk in ``quantize_rows``
    # GPTQ onto this type (``gptq_grid``) needs the fit/round split: ``fit_params`` per block
    # and ``round_to_grid`` per column; the legacy and k-quant codecs have it
    gptq_capable: ClassVar[bool] = False
    # byte offsets of the block's float16 scale fields (d, dmin, m): every value a block decodes
    # to is an integer code times (and plus) these, so they alone decide whether it is finite;
    # None (the float types): decode the block to tell
    scale_offsets: ClassVar[tuple[int, ...] | None] = None

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
        """Rows ``[rows, ne0]`` (any float dtype) as ``ggml_quantize_chunk`` writes them;
        ``importance`` ``[ne0]`` is the imatrix of the row's columns. Quantized in chunks of
        whole rows, straight into the output."""
        rows, cols = w.shape
        self.check_row(cols)
        out = torch.empty(rows, cols // self.block_size * self.type_size, dtype=torch.uint8)
        imp = None if importance is None else importance.to("cpu", torch.float32).reshape(1, cols)
        step = max(1, self.chunk_elements // max(cols, 1))

        def one(start: int) -> None:
            chunk = w[start:start + step].to("cpu", torch.float32)
            out[start:start + step] = self.quantize_row_chunk(chunk, imp)
        run_chunks(one, range(0, rows, step))
        return out

    def quantize_row_chunk(self, w: torch.Tensor, importance: torch.Tensor | None
                           ) -> torch.Tensor:
        """Whole rows ``[r, ne0]`` float32 → ``[r, row_bytes]``; ``importance`` ``[1, ne0]``.
        Codecs whose search looks at whole rows (the legacy ``_impl``'s ``sigma2``) override
        this."""
        rows, cols = w.shape
        imp = None if importance is None else \
            importance.expand(rows, cols).reshape(-1, self.block_size)
        return self.quantize(w.reshape(-1, self.block_size), imp).reshape(rows, -1)

    def dequantize_rows(self, data: torch.Tensor, cols: int) -> torch.Tensor:
        self.check_row(cols)
        rows = data.numel() // (cols // self.block_size * self.type_size)
        return self.dequantize(data.reshape(-1, self.type_size)).reshape(rows, cols)

    def non_finite_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """``[n_blocks, type_size]`` uint8 → bool ``[n_blocks]``: which blocks decode to some
        NaN/Inf. Reads only the scale fields (a full decode of every tensor cost more than the
        quantization itself); the same answer as decoding, by the argument above."""
        blocks = blocks.reshape(-1, self.type_size)
        if self.scale_offsets is None:
            return ~torch.isfinite(self.dequantize(blocks)).all(dim=1)
        bad = torch.zeros(blocks.shape[0], dtype=torch.bool)
        for offset in self.scale_offsets:
            scale = blocks[:, offset:offset + 2].contiguous().view(torch.float16).reshape(-1)
            bad |= ~torch.isfinite(scale)
        return bad

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


def declare(load: Callable[[], None]) -> None:
    """``load`` imports the built-in codecs' modules (each registers its types)."""
    _LOAD.append(load)


def _fill() -> None:
    while _LOAD:
        load = _LOAD.pop()
        try:
            load()
        except BaseException:  # tried again by the next lookup, which says why again
            _LOAD.append(load)
            raise


def get_codec(name: str) -> BlockCodec:
    key = str(name).upper()
    if key not in _CODECS:
        _fill()
    if key not in _CODECS:
        raise ConfigError(f"unknown GGUF tensor type {name!r}; known: {', '.join(codec_names())}")
    return _CODECS[key]


def codec_for_id(type_id: int) -> BlockCodec | None:
    _fill()
    return next((c for c in _CODECS.values() if c.type_id == type_id), None)


def codec_names() -> list[str]:
    _fill()
    return sorted(_CODECS)

