"""Resolve a source (local dir, Hub id, ``sample:NAME``) into a lazy ``Model`` handle."""
from __future__ import annotations

import errno
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from quantbench.errors import ModelLoadError
from quantbench.inputs import os_error_message, read_json_object
from quantbench.lazy import torch
from quantbench.localpath import looks_local, missing
from quantbench.models.arch import ArchSpec, arch_of
from quantbench.models.weights import LazyWeights, load_pickled_weights

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
AUX_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
)
DTYPE_NAMES = ("float16", "bfloat16", "float32")  # the dtypes a config may name


def torch_dtype(name: object, default: "torch.dtype | None" = None) -> "torch.dtype | None":
    """The torch dtype a config names (one of :data:`DTYPE_NAMES`), else ``default``."""
    if name not in DTYPE_NAMES:
        return default
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


@dataclass
class Model:
    """A checkpoint opened lazily: config, architecture mapping, weights read on demand."""

    source: str
    path: Path
    config: dict[str, Any]
    arch: ArchSpec
    weights: LazyWeights
    trust_remote_code: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def hparams(self) -> dict[str, Any]:
        """The decoder's hyperparameters (a multimodal checkpoint's ``text_config``; see
        ``ArchSpec.hparams``); ``config`` is the whole file, as outputs copy it."""
        return self.arch.hparams(self.config)

    @property
    def num_blocks(self) -> int:
        return int(self.hparams[self.arch.num_blocks_key])

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.hparams.get("tie_word_embeddings", False)) or (
            f"{self.arch.lm_head}.weight" not in self.weights
        )

    @property
    def dtype(self) -> torch.dtype:
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        if name in DTYPE_NAMES:
            return torch_dtype(name)
        first = next(iter(self.weights.names()))
        return self.weights.get(first).dtype

    def block_tensor_names(self, index: int) -> list[str]:
        return [n for n in self.weights.names() if self.arch.block_of(n) == index]

    def other_tensor_names(self) -> list[str]:
        return [n for n in self.weights.names() if self.arch.block_of(n) is None]

    def passthrough_tensors(self) -> dict[str, list[str]]:
        """``{part: tensor names}`` of the parts copied through unquantized (a multimodal
        checkpoint's vision tower and projector; ``ArchSpec.passthrough``), in spec order."""
        parts: dict[str, list[str]] = {what: [] for _, what in self.arch.passthrough}
        for name in self.weights.names():
            what = self.arch.passthrough_part(name)
            if what is not None:
                parts[what].append(name)
        return {what: names for what, names in parts.items() if names}

    def passthrough_report(self) -> dict[str, dict[str, Any]]:
        """``{part: {"tensors": n, "dtype": stored dtype}}`` of the parts copied through
        unquantized (the manifest's ``passthrough`` entry; empty for a text-only model)."""
        out = {}
        for what, names in self.passthrough_tensors().items():
            dtypes = sorted({str(self.weights.dtype(n)).removeprefix("torch.") for n in names})
            out[what] = {"tensors": len(names), "dtype": "/".join(dtypes)}
        return out


    def iter_blocks(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yield ``(index, {name: tensor})`` one decoder block at a time."""
        for index in range(self.num_blocks):
            yield index, dict(self.weights.iter(self.block_tensor_names(index)))

    def aux_files(self) -> list[Path]:
        """Tokenizer and generation files to carry into every output."""
        return [self.path / name for name in AUX_FILES if (self.path / name).is_file()]

    def tokenizer(self):
        """The source's tokenizer; one that is missing, unreadable or damaged is one line
        (transformers raises many types for a damaged file: every one is the files' fault)."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(
                str(self.path), trust_remote_code=self.trust_remote_code
            )
        except PermissionError as exc:
            raise ModelLoadError(f"no usable tokenizer in {self.path}: "
                                 f"{os_error_message(exc.filename or self.path, exc)}") from exc
        except Exception as exc:  # noqa: BLE001  (JSON, key, type errors of damaged files)
            why = (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__
            raise ModelLoadError(
                f"no usable tokenizer in {self.path} ({type(exc).__name__}: {why}); check its "
                "tokenizer files and config.json, or copy those of the source model there"
            ) from exc

    def fingerprint(self) -> str:
        """Identity of the weights for caches: the source plus file sizes and mtimes."""
        parts = [self.source, str(self.path)]
        for path in self.weights.files():
            stat = path.stat()
            parts.append(f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}")
        return "|".join(parts)


def describe_passthrough(report: dict[str, dict[str, Any]]) -> str:
    """``kept in 16-bit: vision tower (32 tensors), multi-modal projector (2 tensors)`` (the
    stored dtype named instead where a part is not 16-bit)."""
    sixteen = {"float16", "bfloat16"}
    wide = all(info["dtype"] in sixteen for info in report.values())
    parts = [f"{what} ({info['tensors']} tensors{'' if wide else ', ' + info['dtype']})"
             for what, info in report.items()]
    return (f"kept in {'16-bit' if wide else 'their stored dtype'}: " + ", ".join(parts)
            + " (not quantized)")


def _read_config(directory: Path) -> dict[str, Any]:
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise ModelLoadError(
            f"{directory} is not a model directory (no config.json); point to a Hugging Face "
            "checkpoint directory, a Hub id, or sample:smollm2"
        )
    return read_json_object(cfg_path, ModelLoadError, "fix or re-download it")


def _validate(directory: Path, config: dict[str, Any], arch: ArchSpec,
              weights: LazyWeights) -> None:
    """Every tensor the config implies, with its shape, and nothing else (models/validate.py);
    leftover buffers are dropped from the weights. A quantized checkpoint (its config has a
    ``quantization_config``) stores other tensors: its format's reader checks it instead."""
    from quantbench.models.validate import Context, check_tensors

    if config.get("quantization_config"):
        log.debug("%s is a quantized checkpoint; its format's reader validates it", directory)
        return
    embed, head = f"{arch.embed}.weight", f"{arch.lm_head}.weight"

    def tied_copy() -> bool:  # read both only for a tied config that also has an lm_head
        return embed in weights and torch.equal(weights.get(embed), weights.get(head))

    shapes = {name: weights.shape(name) for name in weights.names()}
    ctx = Context(str(directory), show=arch.output_name)  # Mixtral: the stored expert names
    weights.drop(check_tensors(config, arch, shapes, ctx, tied_copy))
    _check_float(directory, weights)


def _check_float(directory: Path, weights: LazyWeights) -> None:
    """An unquantized checkpoint holds 16-bit or wider floats: an integer, bool or 8-bit
    float tensor there is a quantized or damaged checkpoint without its
    ``quantization_config``, and would be read as plain numbers (codes as weights)."""
    for name in weights.names():
        dtype = weights.dtype(name)
        if not dtype.is_floating_point or dtype.itemsize < 2:
            raise ModelLoadError(
                f"{directory}: tensor {name} is stored as {str(dtype).removeprefix('torch.')}, "
                "not a floating-point type (float16, bfloat16, float32); a quantized checkpoint "
                "needs its quantization_config in config.json, else re-convert it from the "
                "original weights")


def open_model_dir(directory: Path, source: str, trust_remote_code: bool = False,
                   allow_non_finite: bool = False) -> Model:
    """A checkpoint directory, validated against its config before any work
    (``models/validate.py``); ``allow_non_finite`` lets NaN/Inf weights be read (kept
    unquantized) instead of refused."""
    config = _read_config(directory)
    arch = arch_of(config)
    for key in ("dtype", "torch_dtype"):  # copied into every output's config: must be a dtype
        if config.get(key) is not None and config[key] not in (*DTYPE_NAMES, "float64", "auto"):
            raise ModelLoadError(f"{directory / 'config.json'} '{key}' is {config[key]!r}, not a "
                                 f"dtype ({', '.join(DTYPE_NAMES)}); fix it")
    if list(directory.glob("*.safetensors")) or (directory / "model.safetensors.index.json").is_file():
        weights = LazyWeights.from_dir(directory)
    elif list(directory.glob("pytorch_model*.bin")):
        weights = load_pickled_weights(directory)
    else:
        raise ModelLoadError(
            f"{directory} has a config.json but no weights (*.safetensors or pytorch_model*.bin)"
        )
    if not weights.names():
        raise ModelLoadError(f"{directory} has no tensors in its weight files")
    weights.allow_non_finite = allow_non_finite
    if arch.checkpoint_renames:
        weights.rename(arch.module_name)
    if arch.experts is not None:  # transformers 5's fused 3-D experts, read per expert
        from quantbench.models.experts import fused_views

        weights.split(fused_views(arch, {n: weights.shape(n) for n in weights.names()}))
    _validate(directory, config, arch, weights)
    meta: dict[str, Any] = {}
    sample_meta = directory / "quantbench_sample.json"
    if sample_meta.exists():
        meta["sample"] = read_json_object(sample_meta, ModelLoadError,
                                          "delete the folder to convert the sample again")
    return Model(source, directory, config, arch, weights, trust_remote_code, meta)


def _download_hub(repo_id: str, revision: str | None) -> Path:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        hint = "HF_HUB_OFFLINE is set"
    else:
        hint = None
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # hub client raises many network/auth error types
        reason = hint or f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise ModelLoadError(
            f"{repo_id} is not a local path, and fetching it as a Hub id from the Hugging Face "
            f"Hub failed ({reason}); check the spelling, the network and HF_HUB_OFFLINE, or "
            "pass a local checkpoint directory"
        ) from exc


def load_model(source: str | os.PathLike, trust_remote_code: bool = False,
               revision: str | None = None, allow_non_finite: bool = False) -> Model:
    """Open a model from a local directory, a Hub id, or ``sample:NAME``; nothing is preloaded,
    but the checkpoint is checked against its config first. ``allow_non_finite``: NaN/Inf
    weights are read (and kept unquantized by ``quantize``) instead of refused."""
    text = str(source)
    opts = {"trust_remote_code": trust_remote_code, "allow_non_finite": allow_non_finite}
    if text.startswith("sample:"):
        from quantbench.models.sample import resolve_sample

        return open_model_dir(resolve_sample(text), text, **opts)
    path = Path(text).expanduser()
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise ModelLoadError(os_error_message(path, PermissionError(errno.EACCES, "denied")))
        return open_model_dir(path, text, **opts)
    if path.exists():
        if path.suffix == ".gguf":  # dequantized once to an FP16 checkpoint in the cache
            from quantbench.models.gguf_import import cached_hf_checkpoint

            return open_model_dir(cached_hf_checkpoint(path), text, **opts)
        raise ModelLoadError(
            f"{path} is a file, not a model directory; pass the directory that holds config.json"
        )
    if HUB_ID.match(text) and not looks_local(text):
        return open_model_dir(_download_hub(text, revision), text, **opts)
    raise ModelLoadError(missing(text, "a local checkpoint directory, a Hub id (org/name), or "
                                       "sample:smollm2"))
