"""Lazy tensor access to a checkpoint: one tensor (or one block) at a time."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from quantbench.errors import ModelLoadError
from quantbench.inputs import os_error_message

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"


def _open_checked(path: Path):
    try:  # safetensors reports an unreadable file as a missing one: say what it is
        open(path, "rb").close()
    except OSError as exc:
        raise ModelLoadError(os_error_message(path, exc)) from exc
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]}); "
            "it may be truncated or corrupted: re-download or re-convert it"
        ) from exc


class LazyWeights:
    """Name → tensor, read on demand with ``safe_open`` (memory-mapped, nothing preloaded)."""

    def __init__(self, shards: dict[str, Path]):
        self._shards = shards  # tensor name -> file
        self._handles: dict[Path, object] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}

    @classmethod
    def from_dir(cls, directory: Path) -> "LazyWeights":
        index = directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ModelLoadError(f"{index} is not a valid safetensors index: {exc}") from exc
            shards = {name: directory / fname for name, fname in weight_map.items()}
            missing = sorted({str(p) for p in shards.values() if not p.is_file()})
            if missing:
                raise ModelLoadError(f"shard {missing[0]} listed in {index.name} is missing")
        else:
            files = sorted(f for f in directory.glob("*.safetensors")
                           if f.name not in AUXILIARY_TENSOR_FILES)
            shards = {}
            for path in files:
                for name in _open_checked(path).keys():
                    shards[name] = path
        weights = cls(shards)
        weights.validate()
        return weights

    def validate(self) -> None:
        """Open every shard once so a truncated file fails now, not half-way through."""
        for path in sorted(set(self._shards.values())):
            handle = self._handle(path)
            size = path.stat().st_size
            for name in handle.keys():
                handle.get_slice(name)  # header entry is parseable
            log.debug("checked %s (%d bytes)", path, size)

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = _open_checked(path)
        return self._handles[path]

    def names(self) -> list[str]:
        return list(self._shards)

    def __contains__(self, name: str) -> bool:
        return name in self._shards

    def files(self) -> list[Path]:
        return sorted(set(self._shards.values()))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._shards[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._handle(self._shards[name]).get_slice(name).get_dtype()
        return _ST_DTYPES.get(code, torch.float32)

    def _header(self, path: Path) -> tuple[int, dict]:
        """(offset of the data section, header entries) of one safetensors file."""
        if path not in self._headers:
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                self._headers[path] = (8 + n, json.loads(fh.read(n)))
        return self._headers[path]

    def _read(self, path: Path, name: str) -> torch.Tensor:
        """Read one tensor with a plain file read (no memory map: the pages of a multi-GB
        checkpoint would otherwise stay resident, and counted, for the whole run)."""
        base, header = self._header(path)
        entry = header[name]
        dtype = _ST_DTYPES[entry["dtype"]]
        start, end = entry["data_offsets"]
        buf = bytearray(end - start)
        with open(path, "rb") as fh:
            fh.seek(base + start)
            if fh.readinto(buf) != len(buf):
                raise ValueError("the file ends before the tensor's data")
        if not buf:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(entry["shape"])

    def get(self, name: str) -> torch.Tensor:
        if name not in self._shards:
            raise KeyError(name)
        try:
            self._handle(self._shards[name])  # validated header
            return self._read(self._shards[name], name)
        except (SafetensorError, KeyError, ValueError) as exc:
            raise ModelLoadError(
                f"cannot read {name} from {self._shards[name]} ({exc}); the file may be "
                "truncated: re-download or re-convert it"
            ) from exc

    def iter(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, self.get(name)


# safetensors files a checkpoint directory may carry that are not model weights
AUXILIARY_TENSOR_FILES = frozenset({"awq_search.safetensors"})

_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
              "F64": torch.float64, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16,
              "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
              "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


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

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]


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
