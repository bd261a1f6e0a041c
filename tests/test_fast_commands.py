"""The commands that compute nothing — ``--help``, ``list``, ``inspect``, ``--version``, a usage
error — import no heavy library: each runs in a fresh interpreter and reports which of torch,
transformers, safetensors' torch bindings, numpy and gguf-py it loaded (their import is most of
a slow start; ``benchmarks/bench_cli_startup.py`` times the commands). ``inspect`` of a GGUF
needs gguf-py's reader (and numpy), nothing more; ``quantbench/lazy.py`` explains how the
heavy imports are deferred."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "safetensors.torch", "numpy", "gguf")
GGUF_READER = ("numpy", "gguf")  # gguf-py's GGUFReader memory-maps the file with numpy

# The command, run with ``quantbench.cli.main`` in a fresh interpreter; it reports its exit code
# and the heavy modules it left in ``sys.modules`` to the file named by argv[1].
DRIVER = """
import json, sys
report, args = sys.argv[1], json.loads(sys.argv[2])
from quantbench.cli import main
try:
    main(args)
    code = 0
except SystemExit as exc:
    code = exc.code
with open(report, "w") as fh:
    json.dump({"code": code, "loaded": [m for m in %r if m in sys.modules]}, fh)
""" % (HEAVY,)


def _run(tmp_path: Path, *args: str) -> dict:
    report = tmp_path / "report.json"
    env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(report), json.dumps(args)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and report.is_file(), proc.stderr
    return {**json.loads(report.read_text()), "stdout": proc.stdout, "stderr": proc.stderr}


@pytest.fixture(scope="module")
def artifacts(tiny_llama, tmp_path_factory) -> Path:
    from quantbench.cli import main

    root = tmp_path_factory.mktemp("fast")
    main(["convert", str(tiny_llama), "-o", str(root / "gptq"), "-f", "gptq", "-g", "32"])
    main(["convert", str(tiny_llama), "-o", str(root / "gguf"), "--type", "Q8_0"])
    return root


COMMANDS = {
    "--help": (["--help"], 0, "Commands:"),
    "--version": (["--version"], 0, "version"),
    "list": (["list"], 0, "compressed-tensors"),
    "convert --help": (["convert", "--help"], 0, "--calib-samples"),
    "inspect --help": (["inspect", "--help"], 0, "--tensors"),
    "convert, no argument": (["convert"], 2, "Missing argument 'SOURCE'"),
    "convert, unknown option": (["convert", "x", "-o", "y", "--nope"], 2, "--nope"),
    "compare, bad --bits": (["compare", "x", "--bits", "four"], 2, "--bits"),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_commands_that_compute_nothing_import_no_heavy_library(name, tmp_path):
    args, code, needle = COMMANDS[name]
    run = _run(tmp_path, *args)
    assert run["code"] == code, run["stderr"]
    assert needle in run["stdout"] + run["stderr"]
    assert run["loaded"] == []


def test_inspect_reads_headers_without_torch(artifacts, tmp_path):
    run = _run(tmp_path, "inspect", str(artifacts / "gptq"), "--tensors", "--json",
               str(tmp_path / "i.json"))
    assert run["code"] == 0, run["stderr"]
    assert run["loaded"] == []
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["format"] == "gptq" and info["files_ok"] is True and info["quantized_weights"]
    gguf = _run(tmp_path, "inspect", str(artifacts / "gguf" / "model.gguf"))
    assert gguf["code"] == 0, gguf["stderr"]
    assert set(gguf["loaded"]) <= set(GGUF_READER)


def test_a_damaged_artifact_is_refused_without_torch(artifacts, tmp_path):
    import shutil

    art = Path(shutil.copytree(artifacts / "gptq", tmp_path / "damaged"))
    data = bytearray((art / "quantize_config.json").read_bytes())
    data[len(data) // 2] ^= 0x5A
    (art / "quantize_config.json").write_bytes(bytes(data))
    run = _run(tmp_path, "inspect", str(art))
    assert run["code"] == 2 and "quantize_config.json" in run["stderr"], run["stderr"]
    assert run["loaded"] == []


def test_import_quantbench_loads_its_api_on_first_use(tmp_path):
    """``import quantbench`` imports neither the API modules nor torch; every name of
    ``__all__`` is there (``dir``) and resolves."""
    code = ("import json, sys, quantbench; "
            "before = sorted(m for m in ('quantbench.api', 'quantbench.config', 'torch') "
            "if m in sys.modules); "
            "listed = sorted(set(quantbench.__all__) - set(dir(quantbench))); "
            "from quantbench import QuantizeConfig, quantize; "
            "resolved = [n for n in quantbench.__all__ if getattr(quantbench, n) is not None]; "
            "print(json.dumps([before, listed, len(resolved) == len(quantbench.__all__)]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    before, missing_from_dir, all_resolve = json.loads(proc.stdout.strip().splitlines()[-1])
    assert before == [] and missing_from_dir == [] and all_resolve
    import quantbench

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        quantbench.nope  # noqa: B018
