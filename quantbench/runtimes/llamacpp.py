"""llama.cpp, the reference GGUF runtime: found on disk, or built once from the source that the
``llama-cpp-python`` sdist on PyPI vendors (``vendor/llama.cpp``), and cached.

    python -m quantbench.runtimes.llamacpp          # build (about 10 minutes on 2 cores)

The build makes ``llama-quantize``, ``llama-perplexity``, ``llama-imatrix`` and the shared
``libggml-base`` (whose reference quantizers the tests call through ctypes). Only the sdist comes
from the package index; nothing else is downloaded. Set ``QUANTBENCH_LLAMA_CPP`` to a folder that
holds the binaries to use another build.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from quantbench import tempfiles
from quantbench.errors import QuantbenchError
from quantbench.models.sample import cache_root

log = logging.getLogger(__name__)

SDIST = "llama-cpp-python"
VERSION = "0.3.36"  # pinned: the bit-exactness tests name the llama.cpp they were checked on
TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix")
ENV = "QUANTBENCH_LLAMA_CPP"


class LlamaCppUnavailable(QuantbenchError):
    """llama.cpp is not built and cannot be built here."""


@dataclass(frozen=True)
class LlamaCpp:
    bin_dir: Path
    version: str

    def tool(self, name: str) -> Path:
        return self.bin_dir / name

    @property
    def libggml_base(self) -> Path:
        for name in ("libggml-base.so", "libggml-base.dylib"):
            if (self.bin_dir / name).is_file():
                return self.bin_dir / name
        raise LlamaCppUnavailable(f"{self.bin_dir} has no libggml-base shared library; "
                                  "rebuild with python -m quantbench.runtimes.llamacpp")

    def run(self, name: str, *args: str, timeout: float | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run one tool; its output is returned, and on failure raised with its tail."""
        env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(
            [str(self.bin_dir), *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])}
        proc = subprocess.run([str(self.tool(name)), *map(str, args)], capture_output=True,
                              text=True, timeout=timeout, env=env)
        if check and proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise QuantbenchError(f"{name} exited {proc.returncode}: " + " | ".join(tail))
        return proc


@dataclass(frozen=True)
class PerplexityResult:
    """What ``llama-perplexity`` reports: perplexity over ``chunks`` windows of ``ctx`` (second
    half scored), and, against a saved base, mean KLD, its 99th percentile and top-1 agreement."""

    ppl: float
    chunks: int
    ctx: int
    kld_mean: float | None = None
    kld_p99: float | None = None
    top1: float | None = None


def _number(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


def perplexity(tools: LlamaCpp, model: Path, text_file: Path, ctx: int = 512,
               chunks: int | None = None, save_base: Path | None = None,
               kld_base: Path | None = None, threads: int | None = None) -> PerplexityResult:
    """Run ``llama-perplexity`` on a GGUF. ``save_base`` writes the logits (and the tokens)
    for later ``kld_base`` runs, as llama.cpp's KLD workflow does."""
    args = ["-m", model, "-c", ctx, "-t", threads or os.cpu_count() or 2]
    if chunks:
        args += ["--chunks", chunks]
    if kld_base is not None:
        args += ["--kl-divergence-base", kld_base, "--kl-divergence"]
    else:
        args += ["-f", text_file]
        if save_base is not None:
            args += ["--kl-divergence-base", save_base]
    for _attempt in range(3):  # llama.cpp's logger thread now and then loses the last lines
        log = _joined(tools.run("llama-perplexity", *args))
        if "Final estimate" in log or "Mean PPL(Q)" in log:
            break
    n_chunks = _number(r"calculating perplexity over (\d+) chunks", log) or \
        _number(r"over (\d+) chunks", log)
    if kld_base is not None:
        ppl = _number(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", log)
    else:
        ppl = _number(r"Final estimate: PPL = ([0-9.]+)", log)
    if ppl is None:
        raise QuantbenchError(f"llama-perplexity printed no perplexity for {model}: "
                              + " | ".join(log.strip().splitlines()[-3:]))
    top1 = _number(r"Same top p:\s*([0-9.]+)", log)
    return PerplexityResult(ppl=ppl, chunks=int(n_chunks or 0), ctx=ctx,
                            kld_mean=_number(r"Mean\s+KLD:\s*([0-9.]+)", log),
                            kld_p99=_number(r"99\.0%\s+KLD:\s*([0-9.]+)", log),
                            top1=None if top1 is None else top1 / 100)


def _joined(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def base_tokens(kld_base: Path) -> list[int]:
    """The tokens llama-perplexity evaluated (``n_chunk · n_ctx``), read from its saved base:
    ``_logits_``, int32 n_ctx, int32 n_vocab, int32 n_chunk, int32 tokens, then logits."""
    with open(kld_base, "rb") as fh:
        if fh.read(8) != b"_logits_":
            raise QuantbenchError(f"{kld_base} is not a llama-perplexity logits file")
        n_ctx, _n_vocab, n_chunk = struct.unpack("<iii", fh.read(12))
        data = fh.read(4 * n_ctx * n_chunk)
    return list(struct.unpack(f"<{n_ctx * n_chunk}i", data))


def install_dir(version: str = VERSION) -> Path:
    return cache_root() / "llama.cpp" / version


# Built for this machine's CPU (-march=native) without Intel AMX: virtual machines can report
# AMX tiles that the guest kernel never enabled, and ggml's AMX kernels then die on their first
# instruction (SIGILL in tinygemm_kernel_amx on every quantized matmul). A cached build without
# this tag (an older, AMX-enabled one) is rebuilt.
ISA_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
    if platform.machine().lower() in ("x86_64", "amd64") else ""
BUILD_TAG = f"native {ISA_FLAGS}"
BUILD_FILE = "BUILD"  # beside the tools: the BUILD_TAG they were built with


def _complete(directory: Path) -> bool:
    return all((directory / t).is_file() for t in TOOLS)


def find(version: str = VERSION) -> LlamaCpp | None:
    """The llama.cpp build to use, or None when none is built."""
    if os.environ.get(ENV):
        path = Path(os.environ[ENV]).expanduser()
        if not _complete(path):
            raise LlamaCppUnavailable(f"{ENV}={path} does not hold {', '.join(TOOLS)}")
        return LlamaCpp(path, "external")
    path = install_dir(version) / "bin"
    built = path / BUILD_FILE
    current = _complete(path) and built.is_file() and built.read_text().strip() == BUILD_TAG
    return LlamaCpp(path, version) if current else None


def ensure(version: str = VERSION, jobs: int | None = None) -> LlamaCpp:
    """Find llama.cpp or build it (once; concurrent callers wait on a lock)."""
    found = find(version)
    if found:
        return found
    root = install_dir(version)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = find(version)
        if found:
            return found
        build(root, version, jobs)
    return LlamaCpp(root / "bin", version)


def _missing_build_tools() -> list[str]:
    return [t for t in ("cmake", "c++", "cc") if shutil.which(t) is None]


def build(root: Path, version: str = VERSION, jobs: int | None = None) -> None:
    """Download the sdist, build the tools and libggml-base, install them under ``root/bin``."""
    missing = _missing_build_tools()
    if missing:
        raise LlamaCppUnavailable(f"building llama.cpp needs {', '.join(missing)}; install them "
                                  f"(apt install cmake g++) or set {ENV}")
    with _work_dir("quantbench-llamacpp-") as work:
        log.info("downloading the %s==%s sdist", SDIST, version)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                               "--no-binary", ":all:", f"{SDIST}=={version}", "-d", str(work)],
                              capture_output=True, text=True)
        sdists = list(work.glob("*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise LlamaCppUnavailable(f"could not download the {SDIST}=={version} sdist "
                                      f"(pip: {proc.stderr.strip()[-200:]}); set {ENV} instead")
        src = _extract_vendored(sdists[0], work / "src")
        build_dir = work / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _call(["cmake", "-S", str(src), "-B", str(build_dir), *generator,
               "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_OPENMP=OFF", "-DGGML_NATIVE=ON",
               f"-DCMAKE_C_FLAGS={ISA_FLAGS}", f"-DCMAKE_CXX_FLAGS={ISA_FLAGS}",
               "-DCMAKE_BUILD_RPATH=$ORIGIN", "-DCMAKE_INSTALL_RPATH=$ORIGIN"])
        _call(["cmake", "--build", str(build_dir), "--config", "Release", "-j",
               str(jobs or os.cpu_count() or 2), "--target", *TOOLS])
        with _staged(root.parent, f".{version}.build-") as staged:
            (staged / "bin").mkdir()
            for f in (build_dir / "bin").iterdir():
                if f.is_file() and (f.name in TOOLS or ".so" in f.name or f.suffix == ".dylib"):
                    shutil.copy2(f, staged / "bin" / f.name)
            (staged / "bin" / BUILD_FILE).write_text(BUILD_TAG + "\n")
            if root.exists():
                shutil.rmtree(root)
            staged.rename(root)
    log.info("llama.cpp %s built into %s", version, root)


def _work_dir(prefix: str) -> "contextlib.AbstractContextManager[Path]":
    """A scratch folder in the system's temporary directory, named for this process (see
    :mod:`quantbench.tempfiles`); those of killed builds are removed first."""
    return _staged(Path(tempfile.gettempdir()), prefix)


@contextlib.contextmanager
def _staged(folder: Path, prefix: str) -> Iterator[Path]:
    """A new folder ``folder/PREFIX<owner>-<random>``: gone afterwards unless renamed into
    place, and removed by the next build when a kill cut this one short."""
    tempfiles.sweep(folder, prefix)
    path = tempfiles.make_dir(folder, prefix)
    try:
        yield path
    finally:
        tempfiles.remove(path)


def _extract_vendored(sdist: Path, dest: Path) -> Path:
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
        if not members:
            raise LlamaCppUnavailable(f"{sdist.name} does not vendor llama.cpp")
        tar.extractall(dest, members=members, filter="data")
    return next(dest.glob("*/vendor/llama.cpp"))


def _call(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise LlamaCppUnavailable(f"{cmd[0]} {cmd[1]} failed: {tail}")


CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")


def converter_dir(version: str = VERSION) -> Path:
    """llama.cpp's own HF → GGUF converter (``convert_hf_to_gguf.py``, ``conversion/`` and
    ``gguf-py/``) from the same sdist, extracted once into ``<cache>/llama.cpp/<version>-converter``
    (next to the build); the tests' ground truth. Run it with its ``gguf-py`` on PYTHONPATH.
    Raises LlamaCppUnavailable when the sdist cannot be downloaded."""
    root = install_dir(version).parent / f"{version}-converter"
    if (root / CONVERTER_PARTS[0]).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{version}-converter.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / CONVERTER_PARTS[0]).is_file():
            return root
        with _work_dir("quantbench-converter-") as work, \
                _staged(root.parent, f".{version}-converter.build-") as staged:
            sdist = _download_sdist(work, version)
            _extract_converter(sdist, staged)
            if root.exists():
                shutil.rmtree(root)
            staged.rename(root)
    log.info("llama.cpp %s converter extracted into %s", version, root)
    return root


def _download_sdist(work: Path, version: str) -> Path:
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                           ":all:", f"{SDIST}=={version}", "-d", str(work)],
                          capture_output=True, text=True)
    sdists = list(work.glob("*.tar.gz"))
    if proc.returncode != 0 or not sdists:
        raise LlamaCppUnavailable(f"could not download the {SDIST}=={version} sdist "
                                  f"(pip: {proc.stderr.strip()[-200:]})")
    return sdists[0]


def _extract_converter(sdist: Path, dest: Path) -> None:
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.partition("/vendor/llama.cpp/")[2].split("/")[0] in CONVERTER_PARTS]
        if not members:
            raise LlamaCppUnavailable(f"{sdist.name} does not hold llama.cpp's converter")
        tar.extractall(dest / "src", members=members, filter="data")
    src = next((dest / "src").glob("*/vendor/llama.cpp"))
    for part in CONVERTER_PARTS:
        (src / part).rename(dest / part)
    shutil.rmtree(dest / "src")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tools = ensure()
    print(tools.bin_dir)


if __name__ == "__main__":
    main()
