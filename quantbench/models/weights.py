"""Lazy tensor access to a checkpoint: one tensor (or one block) at a time."""
from __future__ import annotations

import functools
import json
import logging
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

from safetensors import SafetensorError, safe_open

from quantbench.errors import ModelLoadError
from quantbench.finite import count_non_finite, describe_non_finite
from quantbench.inputs import os_error_message
from quantbench.lazy import torch
from quantbench.models.safetensors_header import (check_shards, check_single_copies,
                                                  find_shards, read_checked, renamed_shards)

log = logging.getLogger(__name__)


@functools.cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype code → torch dtype (built when torch is first needed)."""
    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
            "F64": torch.float64, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16,
            "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
            "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
            "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _open_checked(path: Path):
    read_checked(path)  # an unreadable file or a header that cannot be right, named
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]}); "
            "it may be truncated or corrupted: re-download or re-convert it"
        ) from exc


def read_range(path: Path, offset: int, count: int) -> bytearray:
    """``count`` bytes of ``path`` from ``offset``, with a plain read (no memory map: its
    touched pages would stay resident); ValueError when the file ends first."""
    buf = bytearray(count)
    with open(path, "rb") as fh:
        fh.seek(offset)
        if fh.readinto(buf) != count:
            raise ValueError("the file ends before the tensor's data")
    return buf


class LazyWeights:
    """Name → tensor, read on demand with ``safe_open`` (memory-mapped, nothing preloaded).

    Every float tensor read is checked for NaN/Inf (:func:`count_non_finite`): refused naming
    it, unless ``allow_non_finite`` is set (``--allow-non-finite``), when the counts are kept
    in ``non_finite`` (name → count) and a warning names the tensor."""

    def __init__(self, shards: dict[str, Path]):
        self._shards = shards  # tensor name -> file
        self._handles: dict[Path, object] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        self._stored: dict[str, str] = {}  # name → the name the file stores it under (renamed)
        self._views: dict[str, tuple[int, tuple[int, ...]]] = {}  # name → (element offset, shape)
        self.allow_non_finite = False
        self.non_finite: dict[str, int] = {}

    @classmethod
    def from_dir(cls, directory: Path) -> "LazyWeights":
        weights = cls({})
        weights._shards = find_shards(directory, lambda path: weights._handle(path).keys())
        weights.validate()
        return weights

    def validate(self) -> None:
        """Open every shard once so a truncated file fails now, not half-way through; every
        tensor a shard is listed for (a sharded checkpoint's index) must be in it, and no
        other shard may hold a second copy of it."""
        held: dict[Path, set[str]] = {}
        for path in sorted(set(self._shards.values())):
            handle = self._handle(path)
            held[path] = set(handle.keys())
            for name in held[path]:
                handle.get_slice(name)  # header entry is parseable
            check_shards(self._shards, path, held[path])
            log.debug("checked %s (%d bytes)", path, path.stat().st_size)
        check_single_copies(self._shards, held)

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = _open_checked(path)
        return self._handles[path]

    def names(self) -> list[str]:
        return list(self._shards)

    def __contains__(self, name: str) -> bool:
        return name in self._shards

    def rename(self, new_name: Callable[[str], str]) -> None:
        """Know every tensor by ``new_name(stored name)`` (a checkpoint layout older than the
        model's modules: ``ArchSpec.checkpoint_renames``); the files are read as stored."""
        self._shards = renamed_shards(self._shards, self._stored, new_name)

    def _key(self, name: str) -> str:
        return self._stored.get(name, name)

    def split(self, views: dict[str, list[tuple[str, int, tuple[int, ...]]]]) -> None:
        """Know each stored tensor of ``views`` as pieces of it instead: ``(name, element
        offset, shape)``, each a contiguous range of the stored tensor (a fused expert
        parameter read per expert: ``models/experts.py``); nothing is read now."""
        for stored, pieces in views.items():
            path, key = self._shards.pop(stored), self._key(stored)
            self._stored.pop(stored, None)
            for name, offset, shape in pieces:
                if name in self._shards:
                    raise ModelLoadError(f"{path} holds {name} twice (as a tensor and inside "
                                         f"{key}); remove one of them")
                self._shards[name] = path
                self._stored[name] = key
                self._views[name] = (offset, tuple(shape))

    def drop(self, names: Iterable[str]) -> None:
        """Forget tensors the model does not use (leftover buffers; see models/validate.py)."""
        for name in names:
            self._shards.pop(name, None)

    def where(self, name: str) -> str:
        """The file a tensor is read from, for messages."""
        return str(self._shards[name]) if name in self._shards else "memory"

    def checked(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` when it holds no NaN/Inf; else refused (or, allowed, counted and warned)."""
        bad = count_non_finite(tensor)
        if not bad:
            return tensor
        if not self.allow_non_finite:
            raise ModelLoadError(
                f"tensor {name} (in {self.where(name)}) holds {bad} non-finite values "
                f"({describe_non_finite(tensor)}); the checkpoint is damaged: re-download or "
                "re-convert it (convert --allow-non-finite keeps such tensors unquantized)")
        if name not in self.non_finite:
            log.warning("%s holds %d non-finite values (%s); kept as it is (--allow-non-finite)",
                        name, bad, describe_non_finite(tensor))
        self.non_finite[name] = bad
        return tensor

    def files(self) -> list[Path]:
        return sorted(set(self._shards.values()))

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._views:
            return self._views[name][1]
        return tuple(self._handle(self._shards[name]).get_slice(self._key(name)).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._handle(self._shards[name]).get_slice(self._key(name)).get_dtype()
        return _torch_dtypes().get(code, torch.float32)

    def _header(self, path: Path) -> tuple[int, dict]:
        """(offset of the data section, header entries) of one safetensors file."""
        if path not in self._headers:
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                self._headers[path] = (8 + n, json.loads(fh.read(n)))
        return self._headers[path]

    def _read(self, path: Path, name: str, view: tuple[int, tuple[int, ...]] | None = None
              ) -> torch.Tensor:
        """Read one tensor (or a ``view``: element offset and shape inside it) with a plain
        file read (no memory map: the pages of a multi-GB checkpoint would otherwise stay
        resident, and counted, for the whole run)."""
        base, header = self._header(path)
        entry = header[name]
        dtype = _torch_dtypes()[entry["dtype"]]
        start, end = entry["data_offsets"]
        if view is not None:
            size = torch.empty((), dtype=dtype).element_size()
            numel = 1
            for d in view[1]:
                numel *= d
            start, end = start + view[0] * size, start + (view[0] + numel) * size
            entry = {"shape": list(view[1])}
        buf = read_range(path, base + start, end - start)
        if not buf:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(entry["shape"])

    def get(self, name: str) -> torch.Tensor:
        if name not in self._shards:
            raise KeyError(name)
        try:
            self._handle(self._shards[name])  # validated header
            tensor = self._read(self._shards[name], self._key(name), self._views.get(name))
        except (SafetensorError, KeyError, ValueError) as exc:
            raise ModelLoadError(
                f"cannot read {name} from {self._shards[name]} ({exc}); the file may be "
                "truncated: re-download or re-convert it"
            ) from exc
        return self.checked(name, tensor)

    def iter(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, self.get(name)


class InMemoryWeights(LazyWeights):
    """Weights already in memory (a ``.bin`` checkpoint or a model built in a notebook)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__({})
        self._tensors = tensors

    def validate(self) -> None:
        return None

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def files(self) -> list[Path]:
        return []

    def rename(self, new_name: Callable[[str], str]) -> None:
        renamed = {new_name(name): t for name, t in self._tensors.items()}
        if len(renamed) != len(self._tensors):
            raise ModelLoadError("two tensors of the checkpoint name the same module once "
                                 "renamed to the model's layout; remove the stale one")
        self._tensors = renamed

    def drop(self, names: Iterable[str]) -> None:
        for name in names:
            self._tensors.pop(name, None)

    def split(self, views: dict[str, list[tuple[str, int, tuple[int, ...]]]]) -> None:
        for stored, pieces in views.items():
            flat = self._tensors.pop(stored).reshape(-1)
            for name, offset, shape in pieces:
                if name in self._tensors:
                    raise ModelLoadError(f"the checkpoint holds {name} twice (as a tensor and "
                                         f"inside {stored}); remove one of them")
                numel = shape[0] * shape[1]
                self._tensors[name] = flat[offset:offset + numel].reshape(shape)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self.checked(name, self._tensors[name])


def load_pickled_weights(directory: Path) -> InMemoryWeights:
    """``pytorch_model*.bin`` with ``weights_only=True`` (never full unpickling).

    Zip checkpoints (torch >= 1.6) are memory-mapped; pre-zip ("legacy") ones cannot be, so
    they are read whole. Each file must hold a flat dict of tensor name → tensor, as
    ``save_pretrained`` writes: a pickle that would run code or build other objects, a training
    checkpoint that nests the weights (``{"state_dict": ...}``, ``{"model": ...}``), a list, or
    a dict with non-tensor values is refused in one line saying how to convert it (unwrapping a
    nested dict would guess which of its parts are the model), as is a tensor in two files."""
    files = sorted(directory.glob("pytorch_model*.bin"))
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in files:
        for name, tensor in _flat_state_dict(path, _torch_load(path)).items():
            if name in tensors:
                raise ModelLoadError(f"tensor {name} is in both {origin[name].name} and "
                                     f"{path.name}; remove the stale shard from {directory}")
            tensors[name], origin[name] = tensor, path
    log.warning("%s has no safetensors; read %d .bin file(s) with torch.load(weights_only=True) "
                "(no arbitrary unpickling; whole file in memory, not lazy)", directory,
                len(files))
    return InMemoryWeights(tensors)


_CONVERT = ("convert it to safetensors where you trust it (transformers' save_pretrained, or "
            "safetensors.torch.save_file)")


def _torch_load(path: Path):
    """``torch.load`` with ``weights_only=True``; memory-mapped only for a zip checkpoint."""
    import zipfile

    try:
        with open(path, "rb"):
            pass
        zipped = zipfile.is_zipfile(path)
    except OSError as exc:
        raise ModelLoadError(os_error_message(path, exc)) from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as exc:  # noqa: BLE001  (torch raises many types for hostile or broken files)
        hostile = re.search(r"GLOBAL ([\w.]+)", str(exc))  # a callable the pickle would call
        if hostile:
            raise ModelLoadError(
                f"refusing {path}: it does not load with weights_only=True (its pickle calls "
                f"{hostile.group(1)}: it would run code or build objects other than tensors); "
                f"{_CONVERT}") from exc
        detail = [line for line in str(exc).splitlines() if "WeightsUnpickler error" in line]
        first = (detail or str(exc).splitlines() or [""])[0][:160]
        raise ModelLoadError(
            f"{path} is not a readable torch checkpoint ({type(exc).__name__}"
            f"{': ' + first if first else ''}); it may be truncated or corrupted: re-download "
            "it") from exc


def _flat_state_dict(path: Path, data) -> dict[str, torch.Tensor]:
    """``data`` if it is a flat dict of name → tensor, else one line saying what it is."""
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds a Python {type(data).__name__}, not a state dict "
                             f"(tensor name → tensor); save the model's state dict, or {_CONVERT}")
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    if nested:
        raise ModelLoadError(
            f"{path} nests its weights (under {', '.join(map(repr, nested[:3]))}): a training "
            f"checkpoint, not a state dict; save the model's state dict alone (e.g. "
            f"torch.save(ckpt[{nested[0]!r}], ...)) or {_CONVERT}")
    for key, value in data.items():
        if not isinstance(key, str):
            raise ModelLoadError(f"{path}: key {key!r} is not a tensor name (a string); save "
                                 f"the model's state dict, or {_CONVERT}")
        if not isinstance(value, torch.Tensor):
            raise ModelLoadError(
                f"{path}: entry {key!r} holds a Python {type(value).__name__}, not a tensor (a "
                f"training checkpoint?); save the model's state dict alone, or {_CONVERT}")
    return data
