"""Write a safetensors checkpoint tensor by tensor, whose names, dtypes and shapes are known
before any data is: memory held is the tensor being written, never the model.

The layout is the one ``safetensors.torch.save_file`` gives the same tensors (entries sorted by
dtype alignment, largest first, then by name; the JSON header compact, ``__metadata__`` first,
padded with spaces to 8 bytes), so a one-file result is byte-identical to ``save_file`` of the
whole dict. The header is written first; each tensor's bytes go to their computed offset as
they arrive, in any order. A checkpoint over ``max_shard_bytes`` of tensor data is split as
transformers' ``save_pretrained`` splits one (``model-00001-of-0000N.safetensors`` filled in
declaration order, each laid out like ``save_file``, and ``model.safetensors.index.json``).

Until :meth:`SafetensorsWriter.close` has seen every declared tensor, each file's 8-byte
header length is zero, so a killed write leaves no file any reader takes for a checkpoint;
a failed one (an exception inside ``with``, a tensor never given) removes its files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

from quantbench.jsonfile import dumps
from quantbench.lazy import torch
from quantbench.models.safetensors_header import DTYPES, INDEX_NAME

MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")

# safetensors' dtype codes in its enum's order (increasing alignment): ``save_file`` lays out
# the entries by this order descending, then by name
ALIGNMENT_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16",
                   "I32", "U32", "F32", "F64", "I64", "U64")
CODES = {torch_name: code for code, (torch_name, _) in DTYPES.items()}  # "float16" → "F16"


def dtype_code(dtype: torch.dtype) -> str:
    """safetensors' code of a torch dtype (``torch.float16`` → ``"F16"``); ValueError for one
    safetensors has no code for."""
    name = str(dtype).removeprefix("torch.")
    if name not in CODES:
        raise ValueError(f"dtype {dtype} has no safetensors code")
    return CODES[name]


@dataclass(frozen=True)
class Entry:
    """One declared tensor: its file, dtype code, shape and byte span in the data section."""

    name: str
    file: str
    code: str
    shape: tuple[int, ...]
    start: int
    end: int


def _nbytes(code: str, shape: tuple[int, ...]) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel * DTYPES[code][1]


def _layout_key(item: tuple[str, str, tuple[int, ...]]) -> tuple[int, str]:
    name, code, _ = item
    return -ALIGNMENT_ORDER.index(code), name


def plan_shards(declared: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                max_shard_bytes: int) -> list[list[tuple[str, str, tuple[int, ...]]]]:
    """The declared tensors (name, dtype, shape) as ``(name, code, shape)`` grouped into
    shards as huggingface_hub's ``split_torch_state_dict_into_shards`` groups a state dict
    (what transformers' ``save_pretrained`` writes): in declaration order, a new shard begun
    where the next tensor would take the current one past ``max_shard_bytes``, a tensor
    larger than that in a shard of its own, placed when it comes. ValueError for a name
    declared twice or a dtype without a code."""
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = []
    current: list[tuple[str, str, tuple[int, ...]]] = []
    size, seen = 0, set()
    for name, dtype, shape in declared:
        if name in seen:
            raise ValueError(f"tensor {name} is declared twice")
        seen.add(name)
        item = (name, dtype_code(dtype), tuple(int(d) for d in shape))
        nbytes = _nbytes(item[1], item[2])
        if nbytes > max_shard_bytes:
            shards.append([item])
            continue
        if size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += nbytes
    return shards + [current] if current or not shards else shards


def header_bytes(entries: list[Entry], metadata: dict[str, str]) -> bytes:
    """The JSON header ``save_file`` writes for ``entries`` (in layout order), padded with
    spaces to a multiple of 8 bytes (without the 8-byte length before it)."""
    header: dict[str, object] = {"__metadata__": metadata}
    for e in entries:
        header[e.name] = {"dtype": e.code, "shape": list(e.shape),
                          "data_offsets": [e.start, e.end]}
    text = dumps(header, what="safetensors header", separators=(",", ":"),
                 ensure_ascii=False).encode("utf-8")
    return text + b" " * (-len(text) % 8)


def _write_all(handle: BinaryIO, data: bytes | memoryview) -> None:
    """All of ``data`` through an unbuffered file (one ``write`` may take part of it: Linux
    writes at most 2 GiB a call, and a filling disk writes short before ENOSPC)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[handle.write(view):]


class SafetensorsWriter:
    """Stream declared tensors into ``directory`` (``model.safetensors``, or shards and their
    index). ``declared``: ``(name, torch dtype, shape)`` of every tensor, in the order the
    shards are to be filled. :meth:`write` each tensor once, in any order, then :meth:`close`;
    used as a context manager, it closes on success and :meth:`abort` s on an exception."""

    def __init__(self, directory: Path, declared: Iterable[tuple[str, torch.dtype,
                                                                 tuple[int, ...]]],
                 max_shard_bytes: int | None = None, metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.metadata = {"format": "pt", **(metadata or {})}
        limit = MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
        shards = plan_shards(declared, limit)
        n = len(shards)
        self.files = ["model.safetensors"] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.entries: dict[str, Entry] = {}
        self._base: dict[str, int] = {}  # file → offset of its data section
        self._handles: dict[str, BinaryIO] = {}  # unbuffered: nothing left to flush
        self._pending: set[str] = set()
        self._state = "open"
        try:
            for fname, shard in zip(self.files, shards):
                self._start_file(fname, shard)
        except BaseException:
            self.abort()
            raise

    def _start_file(self, fname: str, shard: list[tuple[str, str, tuple[int, ...]]]) -> None:
        """Lay out one file's entries, write its header behind a zero length (filled in by
        :meth:`close`) and size the file to its end."""
        offset, laid = 0, []
        for name, code, shape in sorted(shard, key=_layout_key):
            end = offset + _nbytes(code, shape)
            laid.append(Entry(name, fname, code, shape, offset, end))
            offset = end
        header = header_bytes(laid, self.metadata)
        handle = open(self.directory / fname, "wb", buffering=0)  # tensors go straight out
        self._handles[fname] = handle
        _write_all(handle, bytes(8) + header)
        handle.truncate(8 + len(header) + offset)
        self._base[fname] = 8 + len(header)
        for e in laid:
            self.entries[e.name] = e
            self._pending.add(e.name)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor``'s bytes at its place; ValueError for a tensor not declared, given
        twice, or of another dtype or shape than declared."""
        if self._state != "open":
            raise RuntimeError(f"the safetensors writer is {self._state}")
        entry = self.entries.get(name)
        if entry is None:
            raise ValueError(f"tensor {name} was not declared to the safetensors writer")
        if name not in self._pending:
            raise ValueError(f"tensor {name} written twice")
        code, shape = dtype_code(tensor.dtype), tuple(tensor.shape)
        if (code, shape) != (entry.code, entry.shape):
            raise ValueError(f"tensor {name} is {code} {list(shape)}, but was declared "
                             f"{entry.code} {list(entry.shape)}")
        handle = self._handles[entry.file]
        handle.seek(self._base[entry.file] + entry.start)
        if entry.end > entry.start:
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            _write_all(handle, memoryview(flat.view(torch.uint8).numpy()))
        self._pending.discard(name)

    def close(self) -> list[str]:
        """Finish: every declared tensor was written (else the files are removed and
        ValueError names one missing), the header lengths go in, the index when sharded.
        Returns the file names written."""
        if self._state != "open":
            raise RuntimeError(f"the safetensors writer is {self._state}")
        if self._pending:
            missing = sorted(self._pending)
            self.abort()
            raise ValueError(f"{len(missing)} declared tensor(s) never written, {missing[0]} "
                             "first; no checkpoint was left")
        try:
            if len(self.files) > 1:
                self._write_index()
            for fname, handle in self._handles.items():
                handle.seek(0)
                _write_all(handle, (self._base[fname] - 8).to_bytes(8, "little"))
                handle.close()
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        return list(self.files)

    def _write_index(self) -> None:
        """``model.safetensors.index.json`` as transformers writes it: parameter count, tensor
        bytes and the tensor → file map, keys sorted, two-space indent."""
        entries = self.entries.values()
        numel = sum((e.end - e.start) // DTYPES[e.code][1] for e in entries)
        index = {"metadata": {"total_parameters": numel,
                              "total_size": sum(e.end - e.start for e in entries)},
                 "weight_map": {e.name: e.file for e in entries}}
        (self.directory / INDEX_NAME).write_text(
            dumps(index, what=INDEX_NAME, indent=2, sort_keys=True) + "\n")

    def abort(self) -> None:
        """Close and remove every file this writer made (safe to call twice)."""
        for handle in self._handles.values():
            handle.close()
        made = [*self._handles, *([INDEX_NAME] if len(self.files) > 1 else [])]
        for fname in made:
            try:
                os.unlink(self.directory / fname)
            except FileNotFoundError:
                pass
        self._handles.clear()
        self._state = "aborted"

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is not None:
            if self._state == "open":
                self.abort()
        elif self._state == "open":
            self.close()
