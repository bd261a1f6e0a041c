"""Where a finished quantization keeps its blocks: safetensors files in a temporary folder,
one per block, so a result can be written out in several formats without calibrating or
quantizing again while memory stays one block. The folder is on disk, not in ``/tmp`` (often
RAM): ``$QUANTBENCH_STORE``, else ``results/`` in the quantbench cache. It goes with the result
object (or at interpreter exit); folders of processes that no longer run (a killed run) are
removed when the next store is made (named by :mod:`quantbench.tempfiles`).

Plain tensors are stored as they are; a :class:`QuantizedTensor` as its parts
(``name::codes``, ``::scales``, ``::zeros``, ``::g_idx``, ``::perm``, ``::aux.<key>``) with its
grid, dtype and meta as JSON in the file's metadata: every stored bit comes back as it was.
"""
from __future__ import annotations

import json
import os
import shutil
import weakref
from pathlib import Path
from typing import Any, Iterator

from safetensors import safe_open

from quantbench import tempfiles
from quantbench.config import grid_from_dict
from quantbench.jsonfile import dumps, with_nulls
from quantbench.diskspace import reported
from quantbench.faults import failpoint
from quantbench.lazy import torch
from quantbench.models.cache import cache_root
from quantbench.tensor import QuantizedTensor

PARTS = ("codes", "scales", "zeros", "g_idx", "perm")
_META_KEY = "quantbench_block"


def _own(t: torch.Tensor, seen: set[int]) -> torch.Tensor:
    """A tensor safetensors accepts: contiguous, not sharing storage with another of the file
    (``seen``: the storages taken so far; linears quantized together share one ``perm``)."""
    t = t.detach().cpu()
    storage = t.untyped_storage()
    if not t.is_contiguous() or storage.nbytes() != t.numel() * t.element_size() or \
            (t.numel() and storage.data_ptr() in seen):
        t = t.contiguous().clone()
    if t.numel():
        seen.add(t.untyped_storage().data_ptr())
    return t


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


PREFIX = "result-"


def store_root() -> Path:
    if os.environ.get("QUANTBENCH_STORE"):
        return Path(os.environ["QUANTBENCH_STORE"]).expanduser()
    return cache_root() / "results"


def remove_orphans(root: Path) -> list[Path]:
    """Remove the store folders under ``root`` whose process is gone; return them."""
    return tempfiles.sweep(root, PREFIX)


HINT = "free some space or set QUANTBENCH_STORE to a disk with room for the quantized blocks"


class BlockStore:
    """An append-only sequence of ``(label, {name: tensor or QuantizedTensor})`` on disk."""

    def __init__(self, directory: Path | None = None):
        with reported(store_root() if directory is None else Path(directory), hint=HINT):
            if directory is None:
                root = store_root()
                root.mkdir(parents=True, exist_ok=True)
                remove_orphans(root)
                directory = tempfiles.make_dir(root, PREFIX)
            self.directory = Path(directory)
            self.directory.mkdir(parents=True, exist_ok=True)
        self.labels: list[str] = []
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.directory), True)

    def __len__(self) -> int:
        return len(self.labels)

    def _path(self, i: int) -> Path:
        return self.directory / f"block-{i:05d}.safetensors"

    def add(self, label: str, tensors: dict[str, "torch.Tensor | QuantizedTensor"]) -> None:
        flat: dict[str, torch.Tensor] = {}
        entries: dict[str, Any] = {}
        seen: set[int] = set()
        for name, value in tensors.items():
            if isinstance(value, QuantizedTensor):
                parts = {p: getattr(value, p) for p in PARTS if getattr(value, p) is not None}
                parts.update({f"aux.{k}": v for k, v in value.aux.items()})
                flat.update({f"{name}::{p}": _own(t, seen) for p, t in parts.items()})
                entries[name] = {"grid": value.grid.to_dict(), "dtype": _dtype_name(value.dtype),
                                 "meta": with_nulls(value.meta, f"{label}: {name} statistics"),
                                 "parts": list(parts)}
            else:
                flat[name] = _own(value, seen)
                entries[name] = None
        from safetensors.torch import save_file  # (imports torch, as the tensors here did)

        with reported(self.directory, hint=HINT):
            save_file(flat, str(self._path(len(self.labels))),
                      {_META_KEY: dumps({"label": label, "entries": entries},
                                        what="a block store entry")})
        self.labels.append(label)
        failpoint(f"store-block-{len(self.labels)}")

    def __iter__(self) -> Iterator[tuple[str, dict[str, "torch.Tensor | QuantizedTensor"]]]:
        for i in range(len(self.labels)):
            yield self._read(i)

    def _read(self, i: int) -> tuple[str, dict[str, "torch.Tensor | QuantizedTensor"]]:
        with safe_open(str(self._path(i)), framework="pt") as fh:
            header = json.loads(fh.metadata()[_META_KEY])
            out: dict[str, torch.Tensor | QuantizedTensor] = {}
            for name, entry in header["entries"].items():
                if entry is None:
                    out[name] = fh.get_tensor(name)
                    continue
                parts = {p: fh.get_tensor(f"{name}::{p}") for p in entry["parts"]}
                aux = {p[4:]: t for p, t in parts.items() if p.startswith("aux.")}
                out[name] = QuantizedTensor(
                    codes=parts["codes"], scales=parts["scales"], zeros=parts.get("zeros"),
                    grid=grid_from_dict(entry["grid"]), dtype=getattr(torch, entry["dtype"]),
                    g_idx=parts.get("g_idx"), perm=parts.get("perm"), meta=entry["meta"],
                    aux=aux)
        return header["label"], out

    def close(self) -> None:
        """Remove the folder now (also done when the store is collected)."""
        self._cleanup()
