"""Streaming, atomic artifact writing and format-detecting reading."""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any, Callable

from quantbench.errors import FormatError, ModelLoadError
from quantbench.faults import failpoint
from quantbench.formats.base import MANIFEST, Artifact, Format, read_manifest
from quantbench.formats.manifest import build_manifest, write_json_atomic
from quantbench.formats.file_output import (Layout, check_file_output, check_output_format,
                                            is_file_output)
from quantbench.formats.outputs import (Protected, atomic_output_dir,  # noqa: F401
                                        check_output_space, estimate_output_bytes, model_paths)
from quantbench.formats.outputs import check_output as check_dir_output
from quantbench.jsonfile import NonFiniteJSON, dumps, with_nulls
from quantbench.inputs import read_json_object
from quantbench.lazy import torch
from quantbench.models.safetensors_header import HeaderWeights
from quantbench.models.weights import LazyWeights
from quantbench.registry import format_names, get_format
from quantbench.tensor import QuantizedTensor

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 2 * 1024**3


@functools.cache
def _st_dtypes() -> dict[torch.dtype, str]:
    """torch dtype → safetensors dtype code (built when the first tensor is written)."""
    return {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
            torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
            torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
            torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
            torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}


class ShardedWriter:
    """Stream tensors into ``model-XXXXX.safetensors`` shards of bounded size.

    Each tensor's bytes go to disk as soon as it is added (a raw data file per shard); when
    the shard is full its safetensors header is written and the data copied behind it. Memory
    held: one tensor at a time, whatever the shard size."""

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: dict[str, str] | None = None):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, dict[str, Any]] = {}
        self._pending_bytes = 0
        self._data = None  # the open raw data file of the current shard
        self._shards: list[list[str]] = []
        self._written: set[str] = set()
        self._closed = False

    def _data_path(self, index: int) -> Path:
        return self.directory / f"shard-{index:05d}.data"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._closed:
            raise RuntimeError("writer is closed")
        if name in self._written:
            raise ValueError(f"tensor {name} written twice")
        if tensor.dtype not in _st_dtypes():
            raise ValueError(f"{name}: dtype {tensor.dtype} has no safetensors code")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        if self._data is None:
            self._data = open(self._data_path(len(self._shards)), "wb")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if nbytes:
            self._data.write(memoryview(flat.view(torch.uint8).numpy()))
        start = self._pending_bytes
        self._pending[name] = {"dtype": _st_dtypes()[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [start, start + nbytes]}
        self._pending_bytes += nbytes
        self._written.add(name)

    def _flush(self) -> None:
        index = len(self._shards)
        if self._data is None:
            self._data = open(self._data_path(index), "wb")
        self._data.close()
        header = dumps({"__metadata__": self.metadata, **self._pending}, what="a safetensors "
                       "header", separators=(",", ":")).encode("utf-8")
        header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes
        with open(self.directory / f"shard-{index:05d}.tmp", "wb") as out, \
                open(self._data_path(index), "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, 16 * 1024 * 1024)
        failpoint("write-shard")
        self._data_path(index).unlink()
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes, self._data = {}, 0, None

    def close(self) -> list[str]:
        """Finish: name shards ``model.safetensors`` or ``model-0000i-of-0000n``; write index."""
        if self._pending or not self._shards:
            self._flush()
        self._closed = True
        n = len(self._shards)
        names = ["model.safetensors"] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map: dict[str, str] = {}
        for i, (keys, fname) in enumerate(zip(self._shards, names)):
            os.replace(self.directory / f"shard-{i:05d}.tmp", self.directory / fname)
            weight_map.update({k: fname for k in keys})
        if n > 1:
            total = sum((self.directory / f).stat().st_size for f in names)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.directory / "model.safetensors.index.json").write_text(
                dumps(index, what="model.safetensors.index.json", indent=2))
        return names


def check_output(out: str | os.PathLike, overwrite: bool = False, protect: Protected = (),
                 flag: str = "output") -> Path:
    """Refuse an output that cannot or may not be written, before any work (the rules of
    ``formats/outputs.py``): a directory, or for a path ending in ``.gguf`` the one GGUF file it
    names (``formats/file_output.py``). Returns it resolved."""
    if is_file_output(out):
        return check_file_output(out, overwrite, protect, flag)
    return check_dir_output(out, overwrite, protect, flag)


def write_artifact(qmodel, out: Path, fmt: str | Format, overwrite: bool = False,
                   on_step: Callable[[str], None] | None = None,
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                   command: list[str] | None = None) -> Path:
    """Write a quantization result into ``out`` in format ``fmt``, block by block from its
    store (running the quantization first if it has not run: ``on_step`` then follows it);
    ``command`` (the CLI argv that asked for it) is recorded in the manifest."""
    writer_fmt = get_format(fmt)() if isinstance(fmt, str) else fmt
    layout = Layout.of(out, writer_fmt.name)  # a directory, or -o NAME.gguf: that file
    model = qmodel.source
    writer_fmt.check(qmodel.config, model, qmodel.targets)
    protect = model_paths(model)
    check_output(out, overwrite, protect)  # before quantizing: nothing to lose but a check
    check_output_space(Path(out), qmodel, writer_fmt)
    if not qmodel.done:  # quantize now (the steps of the progress bar), then write
        qmodel.run(on_step)
        on_step = None
    on_step = _with_failpoint(on_step)
    start = time.perf_counter()
    with layout.writing(overwrite, protect, estimate_output_bytes(qmodel, writer_fmt)) as tmp:
        if writer_fmt.container is not None:  # a format with its own file (GGUF)
            tensor_info = writer_fmt.write_container(qmodel, tmp / layout.gguf_name, on_step)
        else:
            tensor_info = _write_shards(qmodel, writer_fmt, tmp, on_step, max_shard_bytes)
        # the method's own files once every block was pulled (AWQ's search, the imatrix a
        # calibrated GGUF run used, the EXL2 measurement and allocation)
        for name in qmodel.method.side_files(tmp):
            os.rename(tmp / name, tmp / layout.side_name(name))
        manifest = build_manifest(tmp, qmodel, writer_fmt.name, tensor_info,
                                  write_seconds=time.perf_counter() - start, command=command,
                                  weight_file=layout.gguf_name)
        write_json_atomic(tmp / layout.manifest_name, manifest)
    log.info("wrote %s (%s)", out, writer_fmt.name)
    return Path(out)


def copy_checkpoint(checkpoint: Path, out: Path, source: str, overwrite: bool = False) -> Path:
    """Copy a checkpoint folder quantbench made (a GGUF's FP16 import) to ``out``, with a
    manifest that lists its files, so a later ``--overwrite`` knows the folder as ours."""
    from quantbench.diskspace import check_free
    from quantbench.formats.manifest import checkpoint_manifest
    from quantbench.formats.outputs import source_paths

    check_output_format(out, "dense")
    files = sorted(p for p in Path(checkpoint).iterdir() if p.is_file())
    needed = sum(p.stat().st_size for p in files)
    protect = [*source_paths(source), (Path(checkpoint), "the imported checkpoint")]
    check_output(out, overwrite, protect)
    check_free(Path(out).absolute().parent, needed, f"the output {out}")
    with atomic_output_dir(out, overwrite, protect, needed) as tmp:
        for f in files:
            shutil.copy2(f, tmp / f.name)
        weights = LazyWeights.from_dir(tmp)
        info = {name: {"shape": list(weights.shape(name)), "quantized": False,
                       "dtype": str(weights.dtype(name)).replace("torch.", ""),
                       "bits_per_weight": weights.dtype(name).itemsize * 8}
                for name in weights.names()}
        config = json.loads((tmp / "config.json").read_text())
        write_json_atomic(tmp / MANIFEST, checkpoint_manifest(
            tmp, source, Path(source).resolve(), config, info))
    return Path(out)


def _with_failpoint(on_step: Callable[[str], None] | None) -> Callable[[str], None]:
    """``on_step`` with the ``write-block`` failpoint after each block written."""
    def step(label: str) -> None:
        if on_step:
            on_step(label)
        failpoint("write-block")
    return step


def _write_shards(qmodel, writer_fmt: Format, tmp: Path,
                  on_step: Callable[[str], None] | None, max_shard_bytes: int
                  ) -> dict[str, dict[str, Any]]:
    """The safetensors layouts: shards, config.json, the source's auxiliary files and the
    format's own text files; returns the manifest's tensor info."""
    model = qmodel.source
    tensor_info: dict[str, dict[str, Any]] = {}
    writer = ShardedWriter(tmp, max_shard_bytes)
    # the names its runtimes read (Mixtral's block_sparse_moe for transformers and vLLM)
    stored = model.arch.output_name if writer_fmt.checkpoint_names else str
    for label, tensors in qmodel.iter_blocks():
        for name, value in tensors.items():
            if isinstance(value, QuantizedTensor):
                for key, packed in writer_fmt.encode(name, value).items():
                    writer.add(stored(key), packed)
                tensor_info[name] = _qt_info(value)
            else:
                writer.add(stored(name), value)
                tensor_info[name] = _plain_info(value)
        if on_step:
            on_step(label)
    writer.close()
    _write_config(tmp, model, writer_fmt.quantization_config(
        qmodel.config, qmodel.targets, model.arch))
    for aux in model.aux_files():
        shutil.copy2(aux, tmp / aux.name)
    for fname, text in writer_fmt.extra_files(qmodel.config, qmodel.targets,
                                              model.arch).items():
        (tmp / fname).write_text(text)
    return tensor_info


def _qt_info(qt: QuantizedTensor) -> dict[str, Any]:
    info = {"shape": list(qt.shape), "quantized": True, "bits": qt.grid.bits,
            "grid": qt.grid.describe(), "bits_per_weight": round(qt.bits_per_weight(), 4)}
    stats = {k: v for k, v in qt.meta.items() if isinstance(v, (int, float)) or v is None}
    if stats:  # what the method measured (GPTQ damping, LLM.int8 outlier columns, ...); a
        # measurement that came out NaN/Inf (an fp16 activation overflow) has no value: null
        info["stats"] = with_nulls(stats, f"{MANIFEST}: stats of a quantized tensor")
    return info


def _plain_info(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "quantized": False, "dtype": str(t.dtype).replace("torch.", ""),
            "bits_per_weight": t.element_size() * 8}


def _write_config(tmp: Path, model, qconfig: dict[str, Any] | None) -> None:
    config = {k: v for k, v in model.config.items() if k != "quantization_config"}
    if qconfig is not None:
        config["quantization_config"] = qconfig
    try:
        text = dumps(config, what="config.json", indent=2, sort_keys=True)
    except NonFiniteJSON as exc:  # Python's json reads a bare NaN in the source's config.json
        raise ModelLoadError(f"the source's config.json has {exc.value} at {exc.where}, which "
                             "is not a value (nor valid JSON); fix it in the source") from None
    (tmp / "config.json").write_text(text)


def open_artifact(path: str | os.PathLike, headers_only: bool = False) -> Artifact:
    """Read an artifact back through its format's reader (detected from the files), checked
    against its manifest and config before use (``formats/artifact_check.py``).

    ``headers_only``: the safetensors files are read as their headers describe them
    (``HeaderWeights``: no tensor data, no torch), for ``Artifact.summary``, not ``quantized``
    or ``dequantized`` (``quantbench inspect``)."""
    from quantbench.formats.artifact_check import check_artifact
    from quantbench.formats.gguf import find_gguf, read_gguf
    from quantbench.localpath import missing, not_an_artifact

    path = Path(path)
    if find_gguf(path) is not None:  # the reader checked its tensors against the metadata
        return check_artifact(read_gguf(path, headers_only), config_checked=True)
    if not path.exists():
        raise FormatError(missing(path, "a quantbench output (the -o of quantbench convert)"))
    if not path.is_dir():
        raise FormatError(f"{path} is not a directory or a .gguf file; pass a quantbench output "
                          "directory")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FormatError(not_an_artifact(path, "inspect"))
    config = read_json_object(cfg_file, FormatError, "the artifact is damaged: restore it or "
                              "re-run quantbench convert")
    manifest = read_manifest(path)
    weights = (HeaderWeights if headers_only else LazyWeights).from_dir(path)
    if not weights.names():
        raise FormatError(f"{path} holds no safetensors or GGUF weights to read back; a "
                          "pytorch_model.bin checkpoint: run quantbench convert on it first")
    _module_names(config, weights)
    name = (manifest or {}).get("format") or _detect(config, weights)
    return check_artifact(get_format(name)().read(path, config, weights, manifest))


def _module_names(config: dict[str, Any], weights: LazyWeights) -> None:
    """Know the tensors of an artifact stored under a family's checkpoint names (Mixtral's
    ``block_sparse_moe``: ``ArchSpec.output_renames``) by the model's module paths."""
    from quantbench.errors import ModelLoadError
    from quantbench.models.arch import arch_for

    try:
        arch = arch_for(config.get("model_type"))
    except ModelLoadError:
        return  # the format's reader says what is wrong with the config
    if arch.output_renames:
        weights.rename(arch.module_name)


def _detect(config: dict[str, Any], weights: LazyWeights) -> str:
    for name in format_names():
        if get_format(name).detect(config, weights):
            return name
    return "dense"
