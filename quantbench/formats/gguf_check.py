"""A bounded walk over a GGUF file's header, before gguf-py's reader touches it.

gguf-py trusts the counts and lengths it reads: a forged array length makes it loop for
hours, a string or a tensor past the end of the file yields short or empty arrays, a tensor
count one too small yields a smaller model. This walk reads every count and length against
the bytes that remain, so nothing it accepts can send the reader past the file: magic and
version; tensor and key/value counts the file can hold; every string and array bounded by the
remaining bytes; value types known; every tensor's ggml type known, its rows whole blocks,
its offset aligned, its bytes (per the type's block size) inside the file and overlapping no
other tensor. Layout: FORMATS.md §5.1. Whether the tensors are the ones the metadata implies
is the next step (``models/gguf_import.check_gguf_tensors``).
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType

from quantbench.errors import QuantbenchError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY, UINT32 = 8, 9, 4
MAX_DIMS = 4          # GGML_MAX_DIMS
MAX_NESTING = 2       # arrays of arrays (none in practice) at most this deep
MIN_KV_BYTES = 8 + 4 + 1             # key length, value type, a one-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset


@dataclass
class GGUFHeader:
    """What the walk read: the scalar and string metadata, the length of every array, and
    each tensor's ggml type name, ``ne`` (innermost first), byte count and offset."""

    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    types: dict[str, int] = field(default_factory=dict)  # key → GGUF value type
    array_lengths: dict[str, int] = field(default_factory=dict)
    tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = field(default_factory=dict)
    data_offset: int = 0


class _Walk:
    """A cursor over the mapped file that refuses to read past its end."""

    def __init__(self, buf, path: Path, error: type[QuantbenchError]):
        self.buf, self.size, self.path, self.error, self.pos = buf, len(buf), path, error, 0

    def fail(self, what: str) -> QuantbenchError:
        return self.error(f"{self.path} is not a readable GGUF file: {what}; it is truncated or "
                          "corrupted: re-create or re-download it")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes, the file has "
                            f"{max(self.size - self.pos, 0)} left")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"the length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not UTF-8 text") from exc

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        """One value of type ``vtype``; an array gives its length (its items are skipped)."""
        if vtype in SCALARS:
            return self.unpack(SCALARS[vtype], what)
        if vtype == STRING:
            return self.string(what)
        if vtype != ARRAY or depth >= MAX_NESTING:
            raise self.fail(f"{what} has value type {vtype}, which GGUF does not define")
        itype = self.unpack("<I", f"the item type of {what}")
        n = self.unpack("<Q", f"the length of {what}")
        if itype in SCALARS:
            self.need(n * struct.calcsize(SCALARS[itype]), f"the {n} items of {what}")
            self.pos += n * struct.calcsize(SCALARS[itype])
            return _Length(n)
        if n * 8 > self.size - self.pos:  # every string or array item takes 8 bytes at least
            raise self.fail(f"{what} declares {n} items, more than the file's remaining "
                            f"{self.size - self.pos} bytes can hold")
        for i in range(n):
            self.value(itype, f"item {i} of {what}", depth + 1)
        return _Length(n)


class _Length(int):
    """An array value: its length only."""


def check_gguf(path: Path, error: type[QuantbenchError]) -> GGUFHeader:
    """Walk ``path``'s header; refuse (``error``) the first thing that cannot be right."""
    path = Path(path)
    with open(path, "rb") as fh:
        if path.stat().st_size < 24:
            raise error(f"{path} is not a readable GGUF file ({path.stat().st_size} bytes); it is "
                        "truncated or corrupted: re-create or re-download it")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _walk(_Walk(buf, path, error))


def _walk(w: _Walk) -> GGUFHeader:
    if bytes(w.buf[:4]) != MAGIC:
        raise w.error(f"{w.path} is not a readable GGUF file (it starts with "
                      f"{bytes(w.buf[:4])!r}, not b'GGUF'); it is truncated or corrupted: "
                      "re-create or re-download it")
    w.pos = 4
    version = w.unpack("<I", "the version")
    if version not in VERSIONS:
        raise w.fail(f"version {version} (quantbench reads little-endian versions 2 and 3)")
    n_tensors = w.unpack("<Q", "the tensor count")
    n_kv = w.unpack("<Q", "the key/value count")
    if n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES > w.size - w.pos:
        raise w.fail(f"it declares {n_tensors} tensors and {n_kv} key/values, more than its "
                     f"{w.size} bytes can hold")
    header = GGUFHeader(version)
    for i in range(n_kv):
        key = w.string(f"key {i}")
        if key in header.metadata or key in header.array_lengths:
            raise w.fail(f"key {key!r} appears twice")
        vtype = w.unpack("<I", f"the type of {key!r}")
        value = w.value(vtype, repr(key))
        header.types[key] = vtype
        if isinstance(value, _Length):
            header.array_lengths[key] = int(value)
        else:
            header.metadata[key] = value
    alignment = _alignment(w, header)
    infos = [_tensor_info(w, i, alignment) for i in range(n_tensors)]
    header.data_offset = -(-w.pos // alignment) * alignment
    _place(w, header, infos, alignment)
    return header


def _alignment(w: _Walk, header: GGUFHeader) -> int:
    value = header.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if header.types.get("general.alignment", UINT32) != UINT32:
        raise w.fail("general.alignment is not a uint32")
    if value <= 0 or value & (value - 1):
        raise w.fail(f"general.alignment {value!r} is not a power of two")
    return value


def _tensor_info(w: _Walk, index: int, alignment: int
                 ) -> tuple[str, str, tuple[int, ...], int, int]:
    """``(name, ggml type name, ne, bytes, offset)`` of tensor info ``index``."""
    name = w.string(f"the name of tensor {index}")
    n_dims = w.unpack("<I", f"the dimension count of {name}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise w.fail(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} exist)")
    ne = tuple(w.unpack("<Q", f"a dimension of {name}") for _ in range(n_dims))
    raw_type = w.unpack("<I", f"the type of {name}")
    offset = w.unpack("<Q", f"the offset of {name}")
    try:
        ggml_type = GGMLQuantizationType(raw_type)
        block, type_size = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise w.fail(f"tensor {name} has ggml type {raw_type}, which does not exist") from None
    if any(d == 0 for d in ne) or ne[0] % block:
        raise w.fail(f"tensor {name} has dimensions {list(ne)}: rows of {ggml_type.name} must "
                     f"be whole blocks of {block} values")
    if offset % alignment:
        raise w.fail(f"tensor {name}'s offset {offset} is not a multiple of the alignment "
                     f"{alignment}")
    numel = 1
    for d in ne:
        numel *= d
    return name, ggml_type.name, ne, numel // block * type_size, offset


def _place(w: _Walk, header: GGUFHeader, infos, alignment: int) -> None:
    """Every tensor's bytes inside the file, no two sharing bytes, no name twice."""
    data_bytes = w.size - header.data_offset
    for name, type_name, ne, nbytes, offset in infos:
        if name in header.tensors:
            raise w.fail(f"tensor {name} appears twice")
        if offset + nbytes > data_bytes:
            raise w.fail(f"tensor {name} ({type_name} {list(ne)}, {nbytes} bytes at data offset "
                         f"{offset}) runs past the end of the file ({max(data_bytes, 0)} data "
                         "bytes)")
        header.tensors[name] = (type_name, ne, nbytes, offset)
    spans = sorted((offset, offset + nbytes, name)
                   for name, (_, _, nbytes, offset) in header.tensors.items())
    for (start, _, name), (_, prev_end, prev) in zip(spans[1:], spans):
        if start < prev_end:
            raise w.fail(f"tensor {name}'s data overlaps tensor {prev}'s")
    _contiguous(w, spans, data_bytes, alignment)


def _contiguous(w: _Walk, spans, data_bytes: int, alignment: int) -> None:
    """Writers (gguf-py, llama.cpp) lay the tensors out back to back, each padded to the
    alignment: bytes that belong to no tensor mean a type or shape was changed to a smaller
    one (which would read the wrong bytes as the right size)."""
    ends = [0] + [-(-end // alignment) * alignment for _, end, _ in spans]
    starts = [start for start, _, _ in spans] + [data_bytes]
    names = [name for _, _, name in spans]
    for i, (end, start) in enumerate(zip(ends, starts)):
        if start - end >= alignment:
            where = f"after tensor {names[i - 1]}" if i else "before the first tensor"
            raise w.fail(f"{start - end} data bytes {where} belong to no tensor (a tensor's "
                         "type or shape was changed)")


class HeaderReader:
    """What the GGUF importer reads of gguf-py's ``GGUFReader`` — ``fields[key].contents()``
    and ``tensors`` — from the walk alone: scalars and strings as read, an array as a list of
    its length whose items are not read (the vocabulary's size is all a config takes of one),
    tensors by name, type, shape and byte count, their data read only when asked for.
    gguf-py's reader decodes every item of every array (seconds for a 50k-token vocabulary);
    ``quantbench inspect`` reads a GGUF through this instead."""

    def __init__(self, path: Path, header: GGUFHeader):
        self.fields = {key: _Field(value) for key, value in header.metadata.items()}
        self.fields.update({key: _Field([None] * n) for key, n in header.array_lengths.items()})
        self.tensors = [HeaderTensor(path, name, type_name, ne, nbytes, header.data_offset + at)
                        for name, (type_name, ne, nbytes, at) in header.tensors.items()]


@dataclass(frozen=True)
class _Field:
    value: Any

    def contents(self) -> Any:
        return self.value


@dataclass(frozen=True)
class HeaderTensor:
    """A tensor as the walk read it, with the attributes of gguf-py's ``ReaderTensor``."""

    path: Path
    name: str
    type_name: str
    shape: tuple[int, ...]  # ne: the innermost dimension first
    n_bytes: int
    offset: int             # from the start of the file

    @property
    def tensor_type(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.type_name]

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def data(self):
        """The tensor's values as gguf-py gives them: float32/float16 for those types, the
        raw bytes (uint8) for the others; read now."""
        import numpy as np

        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            raw = fh.read(self.n_bytes)
        dtype = {"F32": np.float32, "F16": np.float16}.get(self.type_name, np.uint8)
        return np.frombuffer(raw, dtype=dtype)
