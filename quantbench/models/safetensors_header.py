"""A safetensors checkpoint as its headers say: tensor names, dtypes, shapes and which file
holds each, checked, without torch and without reading tensor data.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor name →
dtype, shape, data offsets) and the data. :func:`check_header` refuses a header whose entries
cannot be right; :class:`HeaderWeights` is a checkpoint folder (one file, or shards with
``model.safetensors.index.json``) held to the same checks as ``models/weights.LazyWeights``,
which reads the tensors. ``quantbench inspect`` describes an artifact from this view.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

from quantbench.errors import ModelLoadError
from quantbench.inputs import os_error_message

INDEX_NAME = "model.safetensors.index.json"

# safetensors files a checkpoint directory may carry that are not model weights
AUXILIARY_TENSOR_FILES = frozenset({"awq_search.safetensors"})

# safetensors dtype code → (torch's name for the dtype, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F16": ("float16", 2), "BF16": ("bfloat16", 2), "F32": ("float32", 4),
    "F64": ("float64", 8), "I8": ("int8", 1), "U8": ("uint8", 1), "I16": ("int16", 2),
    "I32": ("int32", 4), "I64": ("int64", 8), "BOOL": ("bool", 1), "U16": ("uint16", 2),
    "U32": ("uint32", 4), "U64": ("uint64", 8), "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1)}

Header = dict[str, dict[str, Any]]  # tensor name → {"dtype", "shape", "data_offsets"}


def read_checked(path: Path) -> tuple[int, Header]:
    """``(offset of the data section, entries)`` of a readable file that passes
    :func:`check_header`; an unreadable file is one line naming it."""
    try:  # say what is wrong with the file before any parsing does
        open(path, "rb").close()
    except OSError as exc:
        raise ModelLoadError(os_error_message(path, exc)) from exc
    return check_header(path)


def check_header(path: Path) -> tuple[int, Header]:
    """Refuse a safetensors header whose entries cannot be right, naming the tensor: an
    unknown dtype, a byte count other than dtype × shape, data past the end of the file, two
    tensors sharing bytes. (safetensors refuses most of these too, but without the name.)
    Returns the offset of the data section and the tensor entries (no ``__metadata__``)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > size - 8:
            raise ModelLoadError(f"{path} is not a safetensors file (its header length runs "
                                 "past the end): it is truncated or damaged; re-download it")
        try:
            header = json.loads(fh.read(n), object_pairs_hook=_no_duplicate_keys)
        except _DuplicateKey as exc:
            raise ModelLoadError(f"{path}: the safetensors header lists {exc} twice; the file "
                                 "is corrupted: re-download or re-convert it") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{path}: the safetensors header is not valid JSON ({exc}); "
                                 "the file is truncated or corrupted: re-download it") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: the safetensors header is not a JSON object; the file "
                             "is corrupted: re-download it")
    spans = []
    for name, entry in header.items():
        if name != "__metadata__":
            spans.append((*_entry_span(path, name, entry, size - 8 - n), name))
    spans.sort()
    for (start, end, name), (_, prev_end, prev) in zip(spans[1:], spans):
        if start < prev_end:
            raise ModelLoadError(f"{path}: tensor {name}'s data overlaps tensor {prev}'s; the "
                                 "file is damaged: re-download or re-convert it")
    return 8 + n, {k: v for k, v in header.items() if k != "__metadata__"}


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list) -> dict:
    """A JSON object whose keys are unique (``json`` keeps the last of a repeated key: two
    entries for one tensor would be read as one, silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _entry_span(path: Path, name: str, entry, data_bytes: int) -> tuple[int, int]:
    """``(start, end)`` of one header entry's data, after checking it fits."""
    def bad(what: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: tensor {name} {what}; the file is truncated or "
                              "corrupted: re-download or re-convert it")

    if not isinstance(entry, dict):
        raise bad("has no header entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise bad(f"has dtype {dtype!r}, which quantbench does not read")
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise bad(f"has shape {shape!r}, not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_count, offsets)) \
            or offsets[1] < offsets[0]:
        raise bad(f"has data offsets {offsets!r}")
    start, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    need = numel * DTYPES[dtype][1]
    if end - start != need:
        raise bad(f"has {end - start} bytes of data but {dtype} x {shape} needs {need}")
    if end > data_bytes:
        raise bad(f"runs past the end of the file (byte {end} of {data_bytes} data bytes)")
    return start, end


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def weight_map(index: Path) -> dict[str, str]:
    """The index's tensor name → shard file name, each a plain file name beside it; anything
    else (not an object, no ``weight_map``, a shard outside the folder) is one line."""
    from quantbench.inputs import read_json_object

    hint = "re-download the checkpoint or re-save it with save_pretrained"
    found = read_json_object(index, ModelLoadError, hint).get("weight_map")
    if not isinstance(found, dict) or not found:
        raise ModelLoadError(f"{index} has no 'weight_map' object (tensor name → shard file); "
                             f"{hint}")
    for name, fname in found.items():
        if not isinstance(fname, str) or not fname or "/" in fname or "\\" in fname \
                or fname in (".", ".."):
            raise ModelLoadError(f"{index} maps {name} to {fname!r}, which is not a shard file "
                                 f"name beside it; {hint}")
    return found


def renamed_shards(shards: dict[str, Path], stored: dict[str, str],
                   new_name: Callable[[str], str]) -> dict[str, Path]:
    """``shards`` (tensor name → file) with every name replaced by ``new_name(name)``;
    ``stored`` (name → the name the file stores it under) is updated in place. Two tensors
    that would take one name are refused."""
    out: dict[str, Path] = {}
    for name, path in shards.items():
        new = new_name(name)
        if new in out:
            raise ModelLoadError(f"{path} holds {stored.get(name, name)} and another "
                                 f"tensor that both name {new}; remove one of them")
        out[new] = path
        if new != name:
            stored[new] = stored.pop(name, name)
    return out


def find_shards(directory: Path, keys: Callable[[Path], Iterable[str]]) -> dict[str, Path]:
    """Tensor name → the file holding it: from the index when there is one, else from every
    weights file's own names (``keys``); a tensor in two files is refused."""
    index = directory / INDEX_NAME
    if index.exists():
        shards = {name: directory / fname for name, fname in weight_map(index).items()}
        missing = sorted({str(p) for p in shards.values() if not p.is_file()})
        if missing:
            raise ModelLoadError(f"shard {missing[0]} listed in {index.name} is missing")
        return shards
    shards = {}
    for path in sorted(f for f in directory.glob("*.safetensors")
                       if f.name not in AUXILIARY_TENSOR_FILES):
        for name in keys(path):
            if name in shards:
                raise in_two_files(name, shards[name], path, directory)
            shards[name] = path
    return shards


def check_shards(shards: dict[str, Path], path: Path, held: set[str]) -> None:
    """Every tensor the index lists in ``path`` is there (``held``: what it holds)."""
    listed = [n for n, p in shards.items() if p == path and n not in held]
    if listed:
        raise ModelLoadError(f"{INDEX_NAME} lists tensor {listed[0]} in {path}, which does not "
                             "hold it; the checkpoint is incomplete: re-download it")


def check_single_copies(shards: dict[str, Path], held: dict[Path, set[str]]) -> None:
    """No file holds a second copy of a tensor the index places in another."""
    for path, names in held.items():
        for name in sorted(names):
            if shards.get(name, path) != path:  # the index names another shard
                raise in_two_files(name, shards[name], path, path.parent)


def in_two_files(name: str, first: Path, second: Path, directory: Path) -> ModelLoadError:
    """Two copies of one tensor: which is the model's cannot be told, so neither is guessed."""
    return ModelLoadError(f"tensor {name} is in both {first.name} and {second.name}; remove "
                          f"the stale shard from {directory} (or re-download the checkpoint)")


class HeaderWeights:
    """A checkpoint folder's tensors as its headers describe them: names, shapes, dtypes and
    files, checked as ``LazyWeights.from_dir`` checks them; no tensor is read, except the
    small ones a format keeps its settings in (:meth:`raw`)."""

    def __init__(self, shards: dict[str, Path]):
        self._shards = shards  # tensor name -> file
        self._headers: dict[Path, tuple[int, Header]] = {}
        self._stored: dict[str, str] = {}  # name → the name the file stores it under

    def rename(self, new_name) -> None:
        """Know every tensor by ``new_name(stored name)`` (``LazyWeights.rename``)."""
        self._shards = renamed_shards(self._shards, self._stored, new_name)

    @classmethod
    def from_dir(cls, directory: Path) -> "HeaderWeights":
        weights = cls({})
        weights._shards = find_shards(directory, lambda p: sorted(weights._header(p)[1]))
        held = {}
        for path in sorted(set(weights._shards.values())):
            held[path] = set(weights._header(path)[1])
            check_shards(weights._shards, path, held[path])
        check_single_copies(weights._shards, held)
        return weights

    def _header(self, path: Path) -> tuple[int, Header]:
        if path not in self._headers:
            self._headers[path] = read_checked(path)
        return self._headers[path]

    def _entry(self, name: str) -> dict[str, Any]:
        return self._header(self._shards[name])[1][self._stored.get(name, name)]

    def names(self) -> list[str]:
        return list(self._shards)

    def __contains__(self, name: str) -> bool:
        return name in self._shards

    def files(self) -> list[Path]:
        return sorted(set(self._shards.values()))

    def where(self, name: str) -> str:
        return str(self._shards[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype_name(self, name: str) -> str:
        """torch's name for the tensor's dtype (``float16``)."""
        return DTYPES[self._entry(name)["dtype"]][0]

    def element_bits(self, name: str) -> int:
        return DTYPES[self._entry(name)["dtype"]][1] * 8

    def raw(self, name: str) -> bytes:
        """The tensor's stored bytes (little-endian): for the small tensors a format keeps
        its settings in (a shape, a quant state, a group table)."""
        base, _ = self._header(self._shards[name])
        start, end = self._entry(name)["data_offsets"]
        with open(self._shards[name], "rb") as fh:
            fh.seek(base + start)
            data = fh.read(end - start)
        if len(data) != end - start:
            raise ModelLoadError(f"cannot read {name} from {self._shards[name]} (the file ends "
                                 "before the tensor's data); the file may be truncated: "
                                 "re-download or re-convert it")
        return data

    def ints(self, name: str) -> list[int]:
        """A small integer tensor's values, flattened (row-major)."""
        code = self._entry(name)["dtype"]
        width = DTYPES[code][1]
        signed = code.startswith("I")
        if not (code.startswith(("I", "U")) or code == "BOOL"):
            raise ModelLoadError(f"{name} in {self._shards[name]} is {code}, not an integer "
                                 "tensor; the checkpoint is damaged")
        data = self.raw(name)
        return [int.from_bytes(data[i:i + width], "little", signed=signed)
                for i in range(0, len(data), width)]
