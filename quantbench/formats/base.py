"""What every checkpoint format implements, and the artifact its reader returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator

from quantbench.config import QuantizeConfig
from quantbench.errors import ConfigError, FormatError
from quantbench.finite import count_non_finite, describe_non_finite
from quantbench.lazy import torch
from quantbench.models.arch import ArchSpec, arch_of
from quantbench.models.weights import LazyWeights
from quantbench.tensor import QuantizedTensor

MANIFEST = "quantbench.json"
GGUF_FILE = "model.gguf"  # the GGUF inside an output directory (``-o NAME.gguf``: NAME.gguf)
MANIFEST_VERSION = 1  # what build_manifest writes (formats/manifest.py) and the newest read
Progress = Callable[[str], None]


@dataclass(frozen=True)
class TensorSummary:
    """A quantized tensor as its file headers (and the small tensors beside it that hold its
    settings) say it decodes: the logical shape, the grid and the bits it is stored in —
    what ``QuantizedTensor.shape``, ``.grid`` and ``.storage_bits()`` of the decoded tensor
    give, without reading its codes (``quantbench inspect``)."""

    shape: tuple[int, ...]
    grid: Any
    storage_bits: int


@dataclass
class Artifact:
    """A written checkpoint read back: HF config, manifest, and its tensors.

    ``quantized`` maps HF weight names (``...q_proj.weight``) to the QuantizedTensors the format
    stores; ``plain`` lists the tensors stored as-is. ``dequantized()`` yields every HF tensor
    as a runtime would see it (quantized ones as exact float32 ``scale·(code−zero)``), which is
    what the evaluator measures.
    """

    path: Path
    format: str
    config: dict[str, Any]
    weights: LazyWeights
    manifest: dict[str, Any] | None = None
    decode: Callable[["Artifact", str], QuantizedTensor] | None = None
    summarize: Callable[["Artifact", str], TensorSummary] | None = None  # decode, from headers
    quantized_names: list[str] = field(default_factory=list)
    plain_names: list[str] = field(default_factory=list)
    runtime: dict[str, Any] = field(default_factory=dict)  # run-time settings, e.g. LLM.int8's threshold
    # the logical shape each tensor must have (manifest, config), set by open_artifact's
    # check (formats/artifact_check.py); a decoded quantized tensor is held to it
    expected_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def arch(self) -> ArchSpec:
        return arch_of(self.config)

    def quantized(self, name: str) -> QuantizedTensor:
        qt = self._decoded(self.decode, name)
        self._check_grid(name, qt.grid)
        self._check_shape(name, qt.shape)
        return qt

    def summary(self, name: str) -> TensorSummary:
        """:meth:`quantized` told from the headers: the same checks, no codes read."""
        info = self._decoded(self.summarize, name)
        self._check_grid(name, info.grid)
        self._check_shape(name, info.shape)
        return info

    def _decoded(self, decode: Callable[["Artifact", str], Any] | None, name: str) -> Any:
        if decode is None or name not in self.quantized_names:
            raise KeyError(name)
        try:
            return decode(self, name)
        except (ValueError, IndexError, KeyError) as exc:  # stored tensors and settings disagree
            detail = str(exc).splitlines()[0] if str(exc) else ""
            raise FormatError(f"{self.path}: quantized tensor {name} cannot be decoded with the "
                              f"settings its config states ({type(exc).__name__}: {detail}); "
                              "the config or the weights were edited: re-create the "
                              "artifact") from exc

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        want = self.expected_shapes.get(name)
        if want is not None and tuple(shape) != tuple(want):
            raise FormatError(f"{self.path}: quantized tensor {name} decodes to shape "
                              f"{list(shape)}, its manifest and config say {list(want)}; "
                              "the artifact is damaged: re-create it")

    def _check_grid(self, name: str, grid: Any) -> None:
        """A decoded tensor is on the grid the manifest records, where the manifest records
        one grid for every tensor (integer, codebook): an edited quantization_config (bits,
        group size, zero points, nf4/fp4) that still decodes must not be scored silently."""
        quantize = (self.manifest or {}).get("quantize")
        want = quantize.get("grid") if isinstance(quantize, dict) else None
        if not isinstance(want, dict) or want.get("kind") not in UNIFORM_GRIDS:
            return
        got = grid.to_dict()
        if all(got.get(key) == value for key, value in want.items() if key != "version"):
            return
        raise FormatError(f"{self.path}: quantized tensor {name} is stored on grid "
                          f"{_describe(got)}, the manifest records {_describe(want)}; its config "
                          "or manifest was edited: re-create the artifact")

    def dequantized(self, names: Iterable[str] | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor (or those of ``names``, in that order) as a runtime sees it."""
        if names is None:
            names = self.tensor_names()
        quantized = set(self.quantized_names)
        for name in names:  # quantized: exact scale·(code−zero), as a runtime computes it
            yield name, (finite(self.path, name, self.quantized(name).dequantize())
                         if name in quantized else self.weights.get(name))

    def tensor_names(self) -> list[str]:
        return [*self.plain_names, *self.quantized_names]

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.weights.files())

    def n_weights(self) -> int:
        total = 0
        for name in self.plain_names:
            total += _numel(self.weights.shape(name))
        for name in self.quantized_names:
            total += self.quantized(name).numel
        return total


# grid kinds a manifest records once for all quantized tensors (GGUF mixtures and EXL2 vary
# per tensor, so their manifests' grid is no per-tensor promise)
UNIFORM_GRIDS = ("int", "codebook")


def _describe(grid: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in grid.items() if k != "version") + "}"


def finite(path: Path, name: str, weight: torch.Tensor) -> torch.Tensor:
    """A weight read back from an artifact, refused when its stored scales made it NaN/Inf."""
    bad = count_non_finite(weight)
    if bad:
        raise FormatError(f"{path}: {name} dequantizes to {bad} non-finite values "
                          f"({describe_non_finite(weight)}); its stored scales are damaged: "
                          "re-create the artifact")
    return weight


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


class Format:
    """A writer and a reader for one on-disk layout, registered by name."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    container: ClassVar[str | None] = None  # a format with its own file (gguf): write_container
    stores_codes: ClassVar[bool] = True  # False: quantized weights are written dequantized
    # True: tensors under the family's stored checkpoint names (``ArchSpec.output_name``:
    # Mixtral's block_sparse_moe.experts.N.w1, what transformers' conversion and vLLM read);
    # False: under the module paths (GPTQModel names Mixtral's experts mlp.experts.N.gate_proj)
    checkpoint_names: ClassVar[bool] = True

    def write_container(self, qmodel, file: Path,
                        on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
        """A ``container`` format: stream every block into its own ``file`` (``DIR/model.gguf``,
        or ``NAME.gguf`` itself); return the manifest's tensor info. The safetensors layouts
        use ``encode`` instead."""
        raise NotImplementedError

    def check(self, config: QuantizeConfig, model: Any, targets: list[str]) -> None:
        """Refuse a combination this layout cannot store, before any work starts.

        ``model`` is the source ``Model`` (shapes via ``model.weights.shape``); ``targets`` the
        weight names that will be quantized."""

    def quantization_config(self, config: QuantizeConfig, targets: list[str],
                            arch: ArchSpec) -> dict[str, Any] | None:
        """``config.json["quantization_config"]`` for this layout, or None."""
        return None

    def extra_files(self, config: QuantizeConfig, targets: list[str],
                    arch: ArchSpec) -> dict[str, str]:
        """Further text files this layout needs beside config.json (file name → content),
        e.g. GPTQ's ``quantize_config.json``."""
        return {}

    def encode(self, name: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        """Tensors (with their checkpoint names) that store one QuantizedTensor."""
        raise NotImplementedError

    @classmethod
    def detect(cls, config: dict[str, Any], weights: LazyWeights) -> bool:
        return False

    def read(self, path: Path, config: dict[str, Any], weights: LazyWeights,
             manifest: dict[str, Any] | None) -> Artifact:
        raise NotImplementedError


def require_int_grid(label: str, config: QuantizeConfig) -> None:
    """Refuse a codebook or LLM.int8 grid in a layout that stores integer codes with scales."""
    if config.grid.kind != "int":
        native = {"exl2": "exl2", "gguf": "gguf"}.get(config.grid.kind, "bitsandbytes")
        raise ConfigError(f"{label} stores integer codes with scales, not "
                          f"{config.method} ({config.grid.describe()}); use --format "
                          f"{native} or dense for it")


def sidecar_path(file: "Path | str") -> Path:
    """The manifest beside a single-file output: ``NAME.gguf`` → ``NAME.gguf.quantbench.json``
    (``-o NAME.gguf``, see ``formats/file_output.py``)."""
    file = Path(file)
    return file.with_name(f"{file.name}.{MANIFEST}")


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The artifact directory's ``quantbench.json`` (None when it has none), checked as
    :func:`read_manifest_file` does."""
    return read_manifest_file(Path(path) / MANIFEST)


def read_manifest_file(file: Path) -> dict[str, Any] | None:
    """A manifest (``DIR/quantbench.json`` or a sidecar ``NAME.gguf.quantbench.json``; None
    when missing), checked: unreadable, not JSON, not an object or a key of the wrong type is
    one FormatError naming it."""
    from quantbench.formats.manifest_schema import check_manifest
    from quantbench.inputs import read_json_object

    file = Path(file)
    if not file.exists():
        return None
    data = read_json_object(file, FormatError, "the artifact is damaged: restore its "
                            f"{file.name} or re-run quantbench convert")
    return check_manifest(data, str(file), MANIFEST_VERSION)
