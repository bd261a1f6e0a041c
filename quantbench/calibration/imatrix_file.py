"""llama.cpp's importance-matrix files (``llama-imatrix`` output, ``llama-quantize --imatrix``).

Two layouts, both read by llama.cpp 0.3.36 (``common/imatrix-loader.cpp``):

- **GGUF** (what ``llama-imatrix`` writes by default): keys ``general.type = "imatrix"``,
  ``imatrix.datasets`` (string array), ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32);
  per weight, sorted by name, two F32 tensors ``<name>.in_sum2`` (``ne = [n_cols, n_mat]``: the
  sum of x² per input column over every row seen, per expert) and ``<name>.counts``
  (``ne = [1, n_mat]``: the rows seen). Names are llama.cpp's (``blk.0.attn_q.weight``).
- **legacy ``.dat``** (``--output-format dat``), little-endian: int32 entry count; per entry an
  int32 name length, the name, int32 ``ncall`` (chunks), int32 ``nval`` and ``nval`` float32
  holding ``(sum / count) · ncall``; then, optionally, int32 chunk count and an int32-length
  dataset name.

``llama-quantize`` weights each tensor with its own entry, looked up by name: the importance is
``in_sum2 / counts`` in float32 (1 where a count is 0), or ``values / ncall`` for ``.dat``.
``ImatrixEntry.importance`` computes exactly that. A tensor without an entry is quantized
without importance; an entry whose size is not the tensor's row length is an error (ignored
for ``token_embd``).

A mixture-of-experts block's experts of one projection are one stacked llama.cpp tensor
(``blk.N.ffn_down_exps.weight``) and one entry, one row of ``in_sum2`` and one count per expert
(what ``llama-imatrix`` collects from ``mul_mat_id``: each expert's routed tokens); quantbench
quantizes each expert as its own linear with its own row (:func:`gguf_entries` stacks them,
:func:`importance_for_model` splits them).
"""
from __future__ import annotations

import logging
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from quantbench.errors import ConfigError, FormatError
from quantbench.lazy import numpy as np, torch

log = logging.getLogger(__name__)

SUMS, COUNTS = ".in_sum2", ".counts"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32  # llama-imatrix writes with ggml's default GGUF alignment
_GGUF_UINT32, _GGUF_STRING, _GGUF_ARRAY = 4, 8, 9
_GGML_F32 = 0
_MAX_NAME = 4096


@dataclass(frozen=True, eq=False)  # holds tensors: compare fields
class ImatrixEntry:
    """One weight's statistic: ``sums`` float32 ``[n_mat, n_cols]`` (x² summed per input column,
    one row per expert; a dense weight has ``n_mat = 1``) and ``counts`` int64 ``[n_mat]``."""

    sums: torch.Tensor
    counts: torch.Tensor
    legacy: bool = False  # from a .dat file: sums hold (sum / count) · ncall, counts {ncall}

    @classmethod
    def of(cls, sums, counts) -> "ImatrixEntry":
        """From a sum vector (or ``[n_mat, n_cols]``) and a row count (or one per expert)."""
        sums = torch.as_tensor(sums).detach().to("cpu", torch.float32)
        sums = sums.reshape(1, -1) if sums.dim() == 1 else sums
        counts = torch.as_tensor(counts).detach().to("cpu").reshape(-1)
        counts = counts.round().to(torch.int64) if counts.is_floating_point() else \
            counts.to(torch.int64)
        if sums.dim() != 2 or counts.numel() != sums.shape[0] or sums.shape[1] < 1:
            raise ConfigError(f"an imatrix entry needs sums [n_mat, n_cols] and n_mat counts, "
                              f"got sums {tuple(sums.shape)} and {counts.numel()} counts")
        return cls(sums.contiguous(), counts)

    def importance(self) -> torch.Tensor:
        """The float32 vector ``llama-quantize`` quantizes with (``n_mat · n_cols`` values)."""
        counts = self.counts.to(torch.float32).reshape(-1, 1).expand_as(self.sums)
        if self.legacy:
            return torch.where(counts > 0, self.sums / counts, self.sums).reshape(-1)
        return torch.where(counts > 0, self.sums / counts, torch.ones_like(self.sums)).reshape(-1)


@dataclass(frozen=True, eq=False)  # holds tensors: compare fields
class Imatrix:
    """A whole file: entries by llama.cpp tensor name, and the run's metadata."""

    entries: dict[str, ImatrixEntry]
    datasets: tuple[str, ...] = ()
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    path: Path | None = field(default=None, compare=False)

    def importance(self) -> dict[str, torch.Tensor]:
        return {name: e.importance() for name, e in self.entries.items()}


def importance_from_sums(sums: torch.Tensor, count: int) -> torch.Tensor:
    """The importance llama-quantize derives from a dense weight's entry (float32 division)."""
    return ImatrixEntry.of(sums, count).importance()


# ---------------------------------------------------------------------------------------------
# Reading


def read_imatrix(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``{llama.cpp tensor name: float32 importance}`` from either layout, as llama-quantize
    computes it. ``load_imatrix`` keeps the sums, counts and metadata."""
    return load_imatrix(path).importance()


def load_imatrix(path: str | os.PathLike) -> Imatrix:
    from quantbench.inputs import read_bytes

    path = Path(path)
    if not path.exists():
        raise FormatError(f"imatrix file {path} does not exist")
    data = read_bytes(path, FormatError, "pass the .gguf or .dat file llama-imatrix wrote")
    imatrix = _read_gguf(path, data) if data[:4] == GGUF_MAGIC else _read_legacy(path, data)
    for name, entry in imatrix.entries.items():
        if not torch.isfinite(entry.sums).all():
            raise FormatError(f"{path}: the entry for {name} holds NaN or infinite values "
                              "(llama-quantize refuses it too); re-create the imatrix")
    return Imatrix(imatrix.entries, imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size,
                   imatrix.legacy, path)


def _read_gguf(path: Path, data: bytes) -> Imatrix:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        tensors = {t.name: t for t in reader.tensors}
        for t in tensors.values():
            if t.data_offset + int(t.n_bytes) > len(data) or t.data.size != t.n_elements:
                raise ValueError(f"tensor {t.name} ends past the end of the file")
    except (ValueError, OSError, IndexError, KeyError, struct.error) as exc:
        raise FormatError(f"{path} is not a readable GGUF file ({exc}); it is truncated or "
                          "corrupted: re-create it with llama-imatrix") from exc
    names = sorted({n[: -len(s)] for n in tensors for s in (SUMS, COUNTS) if n.endswith(s)})
    if not names:
        kind = _field(reader, "general.type") or "GGUF"
        raise FormatError(f"{path} is a {kind} file without imatrix entries (<name>.in_sum2 / "
                          "<name>.counts tensors); pass a file written by llama-imatrix")
    entries = {}
    for name in names:
        sums, counts = tensors.get(name + SUMS), tensors.get(name + COUNTS)
        if sums is None or counts is None:
            raise FormatError(f"{path}: {name} has {'sums' if sums is not None else 'counts'} "
                              "but not the other; the file is corrupted")
        if sums.tensor_type != gguf.GGMLQuantizationType.F32 or \
                counts.tensor_type != gguf.GGMLQuantizationType.F32:
            raise FormatError(f"{path}: the sums and counts of {name} must be F32")
        n_mat = int(counts.n_elements)
        if n_mat < 1 or int(sums.n_elements) % n_mat:
            raise FormatError(f"{path}: {name} has {sums.n_elements} sums for {n_mat} counts")
        sums_t = torch.from_numpy(np.array(sums.data, dtype=np.float32).reshape(n_mat, -1))
        counts_t = torch.from_numpy(np.rint(np.array(counts.data, dtype=np.float64))
                                    .astype(np.int64).reshape(-1))
        entries[name] = ImatrixEntry(sums_t, counts_t)
    datasets = _field(reader, KEY_DATASETS) or []
    return Imatrix(entries, tuple(datasets if isinstance(datasets, list) else [datasets]),
                   int(_field(reader, KEY_CHUNK_COUNT) or 0),
                   int(_field(reader, KEY_CHUNK_SIZE) or 0))


def gguf_entries(stats: Mapping[str, ImatrixEntry], arch) -> dict[str, ImatrixEntry]:
    """Per-linear entries (HF names of a model of ``arch``) as llama.cpp's imatrix holds them:
    by llama.cpp tensor name, each expert of a stacked ``*_exps`` tensor one row of its entry
    (in expert order). ConfigError when some expert of a stacked tensor has no entry."""
    from quantbench.formats.gguf_kv import expert_part, gguf_tensor_name

    out: dict[str, ImatrixEntry] = {}
    stacked: dict[str, dict[int, ImatrixEntry]] = {}
    for name, entry in stats.items():
        part = expert_part(arch, name)
        if part is None:
            out[gguf_tensor_name(arch, name)] = entry
        else:
            stacked.setdefault(part[0], {})[part[1]] = entry
    for name, experts in stacked.items():
        if sorted(experts) != list(range(arch.num_experts)):
            raise ConfigError(f"imatrix: statistics for {len(experts)} of the "
                              f"{arch.num_experts} experts of {name}; the pipeline skipped some")
        rows = [experts[e] for e in range(arch.num_experts)]
        out[name] = ImatrixEntry.of(torch.cat([e.sums for e in rows]),
                                    torch.cat([e.counts for e in rows]))
    return out


def importance_for_model(imatrix: Imatrix, model, targets: Sequence[str]
                         ) -> dict[str, torch.Tensor]:
    """``{HF name: importance}`` for the ``targets`` of ``model`` that have an entry, matched
    by llama.cpp tensor name (an expert of a stacked tensor: its part of the entry). A file
    naming tensors the model lacks, or whose entry is not one value per input column (per
    expert), was computed for another model: ConfigError, before any work (an entry for
    ``token_embd`` of another size is ignored, as llama-quantize ignores it)."""
    from quantbench.formats.gguf_kv import gguf_tensor_name
    from quantbench.quant.gguf.plan import gguf_layout

    where = imatrix.path or "the imatrix"
    layout = gguf_layout(model)
    unknown = sorted(set(imatrix.entries) - set(layout))
    if unknown:
        raise ConfigError(f"{where} has entries for tensors this model does not have "
                          f"({len(unknown)} of {len(imatrix.entries)}, e.g. {unknown[0]}); it "
                          "was computed for another model")
    wanted, found = set(targets), {}
    for name, importance in imatrix.importance().items():
        hf = layout[name]
        cols = model.weights.shape(hf[0])[-1]
        if importance.numel() != cols * len(hf):
            if name == "token_embd.weight":
                log.warning("%s: ignoring its %s entry (%d values for %d columns), as "
                            "llama-quantize does", where, name, importance.numel(), cols)
                continue
            per = f" × {len(hf)} experts" if len(hf) > 1 else ""
            raise ConfigError(f"{where}: {name} has {importance.numel()} importance values but "
                              f"the model's tensor has {cols} columns{per}; it was computed "
                              "for another model")
        for n, part in zip(hf, importance.reshape(len(hf), cols)):
            if n in wanted:
                found[n] = part.contiguous()
    missing = [gguf_tensor_name(model.arch, n) for n in targets
               if n not in found and model.arch.block_of(n) is not None]
    if missing:
        log.warning("%s has no entry for %d block tensors (e.g. %s); they are quantized "
                    "without importance, as llama-quantize does", where, len(missing), missing[0])
    return found


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


class _Cursor:
    """Little-endian reads that name the file and what was cut short."""

    def __init__(self, path: Path, data: bytes):
        self.path, self.data, self.pos = path, data, 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.left():
            raise FormatError(f"{self.path} is truncated ({what} ends past the end of the "
                              "file); re-create it with llama-imatrix")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]


def _not_imatrix(path: Path, why: str) -> FormatError:
    return FormatError(f"{path} is not a llama.cpp imatrix file (neither GGUF nor the legacy "
                       f".dat layout: {why})")


def _read_legacy(path: Path, data: bytes) -> Imatrix:
    cur = _Cursor(path, data)
    if len(data) < 4:
        raise _not_imatrix(path, f"{len(data)} bytes")
    n_entries = cur.i32("the entry count")
    if not 1 <= n_entries <= len(data) // 16:
        raise _not_imatrix(path, f"it would hold {n_entries} entries")
    entries = {}
    for i in range(n_entries):
        what = f"entry {i + 1} of {n_entries}"
        length = cur.i32(what)
        if not 1 <= length <= _MAX_NAME:
            raise _not_imatrix(path, f"{what} has a name of {length} bytes")
        try:
            name = cur.take(length, what).decode("utf-8")
        except UnicodeDecodeError:
            raise _not_imatrix(path, f"{what} has a name that is not text") from None
        if not name.isprintable():
            raise _not_imatrix(path, f"{what} has a name that is not text")
        ncall, nval = cur.i32(what), cur.i32(what)
        if nval < 1:
            raise _not_imatrix(path, f"{what} ({name}) has {nval} values")
        values = np.frombuffer(cur.take(4 * nval, what), dtype="<f4").astype(np.float32)
        entries[name] = ImatrixEntry(torch.from_numpy(values).reshape(1, -1),
                                     torch.tensor([ncall], dtype=torch.int64), legacy=True)
    chunk_count, datasets = 0, ()
    if cur.left() >= 4:  # the trailer (chunk count, dataset name) is optional
        chunk_count = cur.i32("the chunk count")
        if cur.left() >= 4:
            length = cur.i32("the dataset name")
            if length > 0:
                datasets = (cur.take(length, "the dataset name").decode("utf-8", "replace"),)
    return Imatrix(entries, datasets, chunk_count, 0, legacy=True)


# ---------------------------------------------------------------------------------------------
# Writing


def write_imatrix(path: str | os.PathLike, stats: Mapping[str, "ImatrixEntry | tuple"], *,
                  datasets: Sequence[str] = (), chunk_count: int = 0, chunk_size: int = 0,
                  legacy: bool = False) -> Path:
    """Write ``{llama.cpp tensor name: (sum of x² per input column, rows seen)}`` as an imatrix
    file llama.cpp reads: GGUF (what llama-imatrix writes by default, byte for byte) or, with
    ``legacy``, the ``.dat`` layout (which needs ``chunk_size``). Written to a temporary file in
    the same folder and renamed into place; nothing is left behind on an error."""
    path = Path(path)
    entries = {name: v if isinstance(v, ImatrixEntry) else ImatrixEntry.of(*v)
               for name, v in stats.items()}
    if not entries:
        raise ConfigError("an imatrix file needs at least one entry")
    if any(e.legacy for e in entries.values()):
        raise ConfigError("entries read from a .dat file hold (sum/count)·ncall, not raw sums; "
                          "write raw sums and counts (GGUF imatrix entries are raw)")
    if legacy:
        payload = _legacy_bytes(entries, datasets, chunk_count, chunk_size)
    else:
        payload = _gguf_bytes(entries, datasets, chunk_count, chunk_size)
    _write_atomic(path, payload)
    log.info("wrote %s (%d imatrix entries)", path, len(entries))
    return path


def _write_atomic(path: Path, payload: bytes) -> None:
    from quantbench.formats.manifest import atomic_write

    if path.is_dir():
        raise ConfigError(f"{path} is a directory; name the imatrix file to write")
    try:
        with atomic_write(path) as fh:
            fh.write(payload)
    except OSError as exc:
        raise ConfigError(f"cannot write {path} ({exc.strerror or exc}); choose a writable "
                          "path") from exc


def _gguf_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _pad(n: int) -> int:
    return -n % ALIGNMENT


def _gguf_bytes(entries: Mapping[str, ImatrixEntry], datasets: Sequence[str],
                chunk_count: int, chunk_size: int) -> bytes:
    """The file ggml's ``gguf_write_to_file`` makes of llama-imatrix's context: four keys, then
    ``in_sum2`` and ``counts`` per name in sorted order, each 32-byte aligned."""
    kv = [_gguf_string("general.type") + struct.pack("<I", _GGUF_STRING)
          + _gguf_string("imatrix"),
          _gguf_string(KEY_DATASETS) + struct.pack("<IIQ", _GGUF_ARRAY, _GGUF_STRING,
                                                   len(datasets))
          + b"".join(_gguf_string(d) for d in datasets),
          _gguf_string(KEY_CHUNK_COUNT) + struct.pack("<II", _GGUF_UINT32, chunk_count),
          _gguf_string(KEY_CHUNK_SIZE) + struct.pack("<II", _GGUF_UINT32, chunk_size)]
    tensors: list[tuple[str, tuple[int, ...], bytes]] = []
    for name in sorted(entries):
        e = entries[name]
        n_mat, n_cols = e.sums.shape
        tensors.append((name + SUMS, (n_cols, n_mat), e.sums.numpy().astype("<f4").tobytes()))
        tensors.append((name + COUNTS, (1, n_mat),
                        e.counts.numpy().astype("<f4").tobytes()))
    infos, blobs, offset = [], [], 0
    for name, ne, blob in tensors:
        dims = ne if ne[-1] > 1 else ne[:1]  # ggml_n_dims: trailing 1s dropped
        infos.append(_gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims,
                                                      _GGML_F32, offset))
        blobs.append(blob + bytes(_pad(len(blob))))
        offset += len(blobs[-1])
    head = GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kv))
    head += b"".join(kv) + b"".join(infos)
    return head + bytes(_pad(len(head))) + b"".join(blobs)


def _legacy_bytes(entries: Mapping[str, ImatrixEntry], datasets: Sequence[str],
                  chunk_count: int, chunk_size: int) -> bytes:
    """llama-imatrix's ``save_imatrix_legacy``: per name (sorted) ``ncall`` = the most rows of
    any expert in chunks (rounded up) and ``(sum / count) · ncall``; entries seen by no row are
    left out; the trailer names the last dataset."""
    if chunk_size < 1:
        raise ConfigError("the legacy .dat imatrix layout needs chunk_size (tokens per chunk)")
    out = []
    for name in sorted(entries):
        e = entries[name]
        if not (e.counts > 0).any():
            log.warning("imatrix entry %s has no data; left out of the .dat file", name)
            continue
        ncall = math.ceil(int(e.counts.max()) / chunk_size)
        counts = e.counts.to(torch.float32).reshape(-1, 1).expand_as(e.sums)
        seen = counts > 0
        values = torch.where(seen, e.sums, torch.ones_like(e.sums)) / \
            torch.where(seen, counts, torch.ones_like(counts)) * torch.tensor(float(ncall))
        raw = name.encode("utf-8")
        out.append(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.numel())
                   + values.numpy().astype("<f4").tobytes())
    dataset = (datasets[-1] if datasets else "").encode("utf-8")
    return struct.pack("<i", len(out)) + b"".join(out) + struct.pack("<ii", chunk_count,
                                                                      len(dataset)) + dataset
