"""``gguf``: llama.cpp's single-file format, written tensor by tensor as blocks are quantized.

An output directory holds ``model.gguf`` (what llama.cpp loads) and ``quantbench.json``;
``-o NAME.gguf`` writes that file, the same bytes, with ``NAME.gguf.quantbench.json`` beside it
(``formats/file_output.py``). The container and constants come from gguf-py (llama.cpp's own
Python library); the block bytes from our codecs (``quant/gguf``). Every tensor's type is
declared before any data is written (the GGUF header lists them), so the plan is fixed up
front: quantized targets get their planned ggml type, 1-D tensors F32, other 2-D tensors F16
(an MoE router F32, as the converter keeps it). Q/K rows are permuted to llama.cpp's interleaved
rotary layout on the way out and back on the way in; row permutation commutes with block
quantization (blocks run along rows), so methods work in the HF layout. A mixture-of-experts
block's experts are quantized one linear each and written as llama.cpp holds them: one 3-D
``blk.N.ffn_*_exps`` tensor per projection (ggml ``ne = [cols, rows, experts]``), every expert
in its one planned type, the experts' block rows one after the other.

The reader opens any llama-family GGUF (ours or llama.cpp's): quantized 2-D tensors (and each
expert of a stacked tensor) become QuantizedTensors holding the block bytes, the rest
dequantized floats.

gguf-py (and numpy) is imported by the functions that read or write a GGUF file, not by this
module: registering the format costs a command that never touches a GGUF nothing.
"""
from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from quantbench.config import GGUFGridConfig, QuantizeConfig
from quantbench.errors import ConfigError, FormatError, ModelLoadError
from quantbench.formats.base import (GGUF_FILE, MANIFEST, Artifact, Format, TensorSummary,
                                     finite)
from quantbench.lazy import numpy as np, torch
from quantbench.quant.gguf.codec import get_codec
from quantbench.registry import register_format
from quantbench.tensor import QuantizedTensor

log = logging.getLogger(__name__)

FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class PlannedTensor:
    hf_name: str  # "" for a tensor made from the config; a stacked one: expert 0's
    gguf_name: str
    shape: tuple[int, ...]  # HF shape ([out, in] for weights; stacked: [experts, out, in])
    ggml_type: str
    parts: tuple[str, ...] = ()  # a stacked expert tensor: every expert's HF tensor, in order

    @property
    def sources(self) -> tuple[str, ...]:
        """The HF tensors whose bytes the GGUF tensor holds, in order."""
        return self.parts or ((self.hf_name,) if self.hf_name else ())

    def nbytes(self) -> int:
        codec = get_codec(self.ggml_type)
        numel = int(np.prod(self.shape))
        return numel // codec.block_size * codec.type_size

    def byte_shape(self) -> tuple[int, ...]:
        codec = get_codec(self.ggml_type)
        *rows, cols = self.shape
        return (*rows, cols // codec.block_size * codec.type_size)


def plan_file(qmodel) -> list[PlannedTensor]:
    """Every tensor of the output in write order (non-block tensors, then block by block)."""
    from quantbench.formats.gguf_kv import expert_part
    from quantbench.formats.gguf_meta import generated_tensors
    from quantbench.quant.gguf.plan import gguf_layout

    model = qmodel.source
    types = qmodel.method.tensor_types()
    experts = model.arch.experts
    routers = {model.arch.block_module(i, experts.router) for i in range(model.num_blocks)
               } if experts else set()  # F32 (the converter's rule for ffn_gate_inp)
    plan = [PlannedTensor("", name, tuple(t.shape), "F32")  # made from the config: first
            for name, t in generated_tensors(decoder_config(model)).items()]
    for gguf_name, names in gguf_layout(model).items():
        name, shape = names[0], tuple(model.weights.shape(names[0]))
        plain = "F32" if len(shape) == 1 or name.rpartition(".")[0] in routers else "F16"
        ggml_type = {types.get(n) or plain for n in names}
        if len(ggml_type) != 1:
            raise FormatError(f"the experts of {gguf_name} were planned in several types "
                              f"({', '.join(sorted(ggml_type))}); llama.cpp stores them in one")
        stacked = expert_part(model.arch, name) is not None
        plan.append(PlannedTensor(name, gguf_name, (len(names), *shape) if stacked else shape,
                                  ggml_type.pop(), tuple(names) if stacked else ()))
    return plan


def _tensor_bytes(item: PlannedTensor, tensors: dict[str, Any], config: dict[str, Any]
                  ) -> np.ndarray:
    """The GGUF bytes of ``item`` from its HF tensors (a stacked one: each expert's rows, in
    expert order)."""
    if not item.parts:
        return _rows_bytes(item, item.hf_name, tensors[item.hf_name], config)
    one = PlannedTensor(item.hf_name, item.gguf_name, item.shape[1:], item.ggml_type)
    return np.stack([_rows_bytes(one, name, tensors[name], config) for name in item.parts])


def _rows_bytes(item: PlannedTensor, name: str, value, config: dict[str, Any]) -> np.ndarray:
    from quantbench.formats.gguf_meta import permute_qk, qk_permute_heads, to_gguf_tensor

    if not isinstance(value, QuantizedTensor):  # norms (+1 for Gemma), Q/K rows permuted
        value = to_gguf_tensor(name, value, config)
        return get_codec(item.ggml_type).quantize_rows(value.reshape(-1, value.shape[-1])) \
            .reshape(*item.byte_shape()).contiguous().numpy()
    if value.grid.kind != "gguf" or value.grid.type != item.ggml_type:
        raise FormatError(f"{name} came as {value.grid.describe()}, planned "
                          f"{item.ggml_type}")
    heads = qk_permute_heads(config, name)  # block rows move whole
    data = permute_qk(value.codes, heads) if heads else value.codes
    return data.contiguous().numpy()


@register_format("gguf")
class GGUFFormat(Format):
    description = "GGUF for llama.cpp: ggml block types and its named mixtures (Q4_K_M, ...)"
    container = "gguf"

    def check(self, config: QuantizeConfig, model: Any, targets: list[str]) -> None:
        from quantbench.formats.gguf_meta import gguf_arch

        if config.grid.kind != "gguf":
            raise ConfigError(f"gguf stores ggml block types, not {config.grid.describe()}; "
                              "pass --type Q4_K_M (or Q8_0, Q5_K_M, ...) with --method rtn, "
                              "imatrix or gptq")
        decoder = decoder_config(model)
        gguf_arch(decoder)
        experts = model.arch.experts
        if experts is not None and experts.normalize_key and not decoder.get(
                experts.normalize_key):
            raise ConfigError(f"this {model.arch.family} config does not renormalise the "
                              f"top-k routing weights ({experts.normalize_key}: false), which "
                              f"llama.cpp's {model.arch.gguf_arch} always does (its logits "
                              "would differ from the model's); write another format")
        for hook in (model.arch.gguf_params, model.arch.gguf_kvs, model.arch.gguf_generate):
            if hook is not None:  # a family's own refusals, before any work
                hook(decoder)

    def write_container(self, qmodel, file: Path,
                        on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Stream the GGUF into ``file``; returns the manifest's tensor info."""
        import gguf

        from quantbench.formats.gguf_meta import generated_tensors
        from quantbench.models.gguf_import import gguf_arch_spec

        model, config = qmodel.source, decoder_config(qmodel.source)
        if model.passthrough_tensors():
            log.info("the GGUF holds the text model only: its %s are not in it (llama.cpp "
                     "reads them from a separate mmproj file, which quantbench does not write)",
                     " and ".join(model.passthrough_tensors()))
        plan = plan_file(qmodel)
        writer = gguf.GGUFWriter(None, model.arch.gguf_arch)
        add_metadata(writer, model, qmodel.config.grid.type, plan)
        for key, value, vtype in qmodel.method.gguf_metadata():  # quantize.imatrix.*
            writer.add_key_value(key, value, gguf.GGUFValueType[vtype])
        for item in plan:
            writer.add_tensor_info(item.gguf_name, item.byte_shape(), np.dtype(np.uint8),
                                   item.nbytes(), gguf.GGMLQuantizationType[item.ggml_type])
        writer.write_header_to_file(file)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        info: dict[str, Any] = {}
        for value in generated_tensors(config).values():  # plan_file put them first; they
            writer.write_tensor_data(value.float().contiguous().numpy())  # get no manifest row
        pending = iter(item for item in plan if item.hf_name)
        read_back = gguf_arch_spec(model.arch.gguf_arch, model.arch.num_experts)  # names as
        #   the GGUF reads back (a multimodal model's text decoder: the text-only model)
        for label, tensors in qmodel.iter_blocks():
            tensors = {n: t for n, t in tensors.items() if model.arch.passthrough_part(n) is None}
            for item in _take(pending, tensors):
                writer.write_tensor_data(_tensor_bytes(item, tensors, config))
                info.update(_infos(item, read_back))
            if on_step:
                on_step(label)
        writer.close()
        return info

    @classmethod
    def detect(cls, config: dict[str, Any], weights) -> bool:
        return False  # a GGUF artifact is recognised by its file, see ``find_gguf``

    def read(self, path: Path, config: dict[str, Any], weights,
             manifest: dict[str, Any] | None) -> Artifact:
        return read_gguf(path)


def add_metadata(writer, model, mixture: str, plan: list[PlannedTensor]) -> None:
    """llama.cpp converter's keys (general.*, <arch>.*, tokenizer.*) for ``model``."""
    from quantbench.formats.gguf_meta import gguf_metadata, gguf_shape, parameter_counts

    counts = parameter_counts((item.gguf_name, gguf_shape(item.shape)) for item in plan)
    for kv in gguf_metadata(decoder_config(model), model.path, ftype=mixture, n_params=counts):
        if kv.key != "general.architecture":  # GGUFWriter(arch=...) wrote it
            writer.add_key_value(kv.key, kv.value, kv.vtype, sub_type=kv.sub_type)


def decoder_config(model) -> dict[str, Any]:
    """The config a GGUF is written from: the decoder's hyperparameters (a multimodal model's
    ``text_config``) under the model's own ``model_type`` (which names the tensor layout)."""
    return {**model.hparams, "model_type": model.config.get("model_type")}


def _take(pending: Iterator[PlannedTensor], tensors: dict[str, Any]) -> list[PlannedTensor]:
    """The planned tensors that this yielded group holds, in plan order (a stacked one with
    every expert)."""
    items, taken = [], 0
    while taken < len(tensors):
        item = next(pending, None)
        missing = [n for n in item.sources if n not in tensors] if item else ["end of plan"]
        if missing:
            raise FormatError(f"{missing[0]} arrived out of order; the GGUF plan and the "
                              "quantizer disagree")
        items.append(item)
        taken += len(item.sources)
    return items


def _infos(item: PlannedTensor, read_back) -> dict[str, dict[str, Any]]:
    """The manifest rows of ``item``: one per HF tensor the GGUF reads back as (each expert
    of a stacked tensor, named as the reader names it)."""
    from quantbench.formats.gguf_kv import hf_tensor_names

    names = hf_tensor_names(read_back, item.gguf_name, len(item.parts) or None)
    if not item.parts:
        return {names[0]: _info(item)}
    one = PlannedTensor(item.hf_name, item.gguf_name, item.shape[1:], item.ggml_type)
    return {name: _info(one) for name in names}


def _info(item: PlannedTensor) -> dict[str, Any]:
    numel = int(np.prod(item.shape))
    quantized = item.ggml_type not in FLOAT_TYPES
    return {"shape": list(item.shape), "quantized": quantized, "gguf_name": item.gguf_name,
            "ggml_type": item.ggml_type, "grid": f"GGUF {item.ggml_type}",
            "bits": GGUFGridConfig(item.ggml_type).bits,
            "bits_per_weight": round(8 * item.nbytes() / numel, 4),
            **({} if quantized else {"dtype": item.ggml_type.lower()})}


# ---------------------------------------------------------------------------------------------
# Reading


def find_gguf(path: Path) -> Path | None:
    """The GGUF file an artifact path stands for: the file itself, or ``model.gguf`` (or the
    only ``*.gguf``) in a directory without ``config.json``."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        if (path / GGUF_FILE).is_file():
            return path / GGUF_FILE
        files = sorted(path.glob("*.gguf"))
        if len(files) == 1:
            return files[0]
    return None


def open_reader(file: Path, headers_only: bool = False):
    """gguf-py's reader, after the bounded header walk (``gguf_check``); ``headers_only``: the
    walk's own view of the file (``HeaderReader``: no array item or tensor data decoded)."""
    from quantbench.formats.gguf_check import HeaderReader, check_gguf

    header = check_gguf(file, FormatError)
    if headers_only:
        return HeaderReader(file, header)
    import gguf

    try:
        return gguf.GGUFReader(str(file))
    except (ValueError, OSError, IndexError, KeyError, struct.error) as exc:
        raise FormatError(f"{file} is not a readable GGUF file ({exc}); it is truncated or "
                          "corrupted: re-create or re-download it") from exc


class GGUFWeights:
    """The LazyWeights interface over a GGUF file: HF names, HF shapes, float tensors (Q/K
    rows back in the HF layout; each expert of a stacked ``ffn_*_exps`` tensor on its own);
    the file is memory-mapped by gguf-py, read per tensor."""

    def __init__(self, file: Path, reader, config: dict[str, Any]):
        from quantbench.models.arch import arch_of
        from quantbench.models.gguf_import import tensor_parts

        self.file, self.config, self.reader = file, config, reader
        try:  # (the tensors the config stands for, e.g. rope_freqs, are left out)
            parts = tensor_parts(reader, arch_of(config))
        except ModelLoadError as exc:
            raise FormatError(f"{file}: {exc}") from exc
        self.tensors = {name: t for name, (t, _) in parts.items()}
        self.experts = {name: e for name, (_, e) in parts.items() if e is not None}

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def files(self) -> list[Path]:
        return [self.file]

    def shape(self, name: str) -> tuple[int, ...]:
        ne = self.tensors[name].shape
        return tuple(int(d) for d in reversed(ne[:2] if name in self.experts else ne))

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32

    def dtype_name(self, name: str) -> str:
        """What :meth:`get` returns: float32 (quantized or not, dequantized)."""
        return "float32"

    def element_bits(self, name: str) -> int:
        return 32

    def n_bytes(self, name: str) -> int:
        """The tensor's bytes in the file (an expert's: its share of the stacked tensor)."""
        t = self.tensors[name]
        return int(t.n_bytes) // (int(t.shape[2]) if name in self.experts else 1)

    def ggml_type(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def raw(self, name: str) -> torch.Tensor:
        """The stored bytes ``[rows, row_bytes]`` (HF row order)."""
        from quantbench.formats.gguf_meta import qk_permute_heads, unpermute_qk

        from quantbench.models.gguf_import import tensor_data

        t = self.tensors[name]
        shape = self.shape(name)
        if name in self.experts:  # expert-major: one expert's rows are one contiguous run
            size = self.n_bytes(name)
            data = tensor_data(self.reader, t, self.experts[name] * size, size)
        else:
            data = tensor_data(self.reader, t).view(np.uint8)
        data = torch.from_numpy(data).reshape(int(np.prod(shape[:-1])), -1)
        heads = qk_permute_heads(self.config, name)
        return unpermute_qk(data, heads) if heads else data

    def get(self, name: str) -> torch.Tensor:
        from quantbench.formats.gguf_meta import norm_offset

        codec = get_codec(self.ggml_type(name))
        shape = self.shape(name)
        w = codec.dequantize_rows(self.raw(name), shape[-1])
        offset = norm_offset(self.config, name)
        if offset:
            w = w - offset  # back to the HF norm weight (llama.cpp's Gemma norms hold 1 + w)
        return finite(self.file, name, w.reshape(shape))

    def iter(self, names):
        for name in names:
            yield name, self.get(name)


def read_gguf(path: Path, headers_only: bool = False) -> Artifact:
    """A GGUF file as an artifact; ``headers_only``: its config holds only what the metadata
    gives (no transformers config class: ``hf_config_from_gguf(full=False)``), for
    ``Artifact.summary`` (``quantbench inspect``)."""
    from quantbench.models.gguf_import import hf_config_from_gguf  # (gguf-py: numpy)

    file = find_gguf(path)
    if file is None:
        raise FormatError(f"{path} holds no GGUF file")
    reader = open_reader(file, headers_only)
    for t in reader.tensors:  # a type we cannot decode is the first thing to say
        try:
            get_codec(t.tensor_type.name)
        except ConfigError as exc:
            raise FormatError(f"{file}: tensor {t.name} has ggml type {t.tensor_type.name}, "
                              "which quantbench does not read; re-quantize with one of its "
                              "types") from exc
    try:
        config = hf_config_from_gguf(reader, full=not headers_only)
    except ModelLoadError as exc:
        raise FormatError(f"{file}: {exc}") from exc
    weights = GGUFWeights(file, reader, config)
    quantized, plain = [], []
    for name in weights.names():
        ggml_type = weights.ggml_type(name)
        is_quantized = ggml_type not in FLOAT_TYPES and len(weights.shape(name)) == 2
        (quantized if is_quantized else plain).append(name)

    def decode(art: Artifact, name: str) -> QuantizedTensor:
        return QuantizedTensor(codes=weights.raw(name), scales=torch.empty(0), zeros=None,
                               grid=GGUFGridConfig(weights.ggml_type(name)),
                               dtype=torch.float16)

    def summarize(art: Artifact, name: str) -> TensorSummary:
        """``decode``'s shape, grid and bits from the header: rows of whole blocks."""
        grid = GGUFGridConfig(weights.ggml_type(name))
        rows, n_bytes = math.prod(weights.shape(name)[:-1]), weights.n_bytes(name)
        codec = grid.codec
        return TensorSummary((rows, n_bytes // rows // codec.type_size * codec.block_size),
                             grid, n_bytes * 8)

    manifest = _manifest(path, file)
    return Artifact(path=Path(path), format="gguf", config=config, weights=weights,
                    manifest=manifest, decode=decode, summarize=summarize,
                    quantized_names=quantized, plain_names=plain,
                    runtime={"gguf_activations": _activations(weights)})


def _manifest(path: Path, file: Path) -> dict[str, Any] | None:
    """The manifest that vouches for the GGUF: ``NAME.gguf.quantbench.json`` beside the file
    passed (``-o NAME.gguf``), or the ``quantbench.json`` of an output directory holding it as
    ``model.gguf``; None for a bare GGUF (another tool's)."""
    from quantbench.formats.base import read_manifest_file
    from quantbench.formats.manifest import manifest_path

    where = manifest_path(path)
    if where is None or (where.name == MANIFEST and file.name != GGUF_FILE):
        return None
    return read_manifest_file(where)


def _activations(weights: GGUFWeights) -> dict[str, str]:
    """Module → the type llama.cpp rounds its input to (every matmul with a 2-D weight; the
    tied token_embd also serves as lm_head)."""
    from quantbench.models.arch import arch_of
    from quantbench.quant.gguf.activations import vec_dot_type

    arch = arch_of(weights.config)
    out = {}
    for name in weights.names():
        act = vec_dot_type(weights.ggml_type(name))
        if act is None or len(weights.shape(name)) != 2:
            continue
        module = name[: -len(".weight")]
        if module == arch.embed:
            if f"{arch.lm_head}.weight" not in weights:
                out[arch.lm_head] = act
            continue
        out[module] = act
    return out
