"""The catalogue of built-ins (``quantbench/builtins.py``) says what their modules register: the
same names, from the module it names, with the same description ``quantbench list`` shows; a
method or format registered by other code still joins the registries and the list."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantbench import builtins, registry
from quantbench.quant.gguf import codec
from quantbench.registry import FORMATS, METHODS

ROOT = Path(__file__).resolve().parents[1]


def _ours(table: registry.Table) -> dict[str, type]:
    table.fill()
    return {n: c for n, c in table.classes.items() if c.__module__.startswith("quantbench.")}


@pytest.mark.parametrize("table,catalogue", [(METHODS, builtins.METHODS),
                                             (FORMATS, builtins.FORMATS)],
                         ids=["methods", "formats"])
def test_the_catalogue_names_what_each_module_registers(table, catalogue):
    registered = _ours(table)
    assert sorted(registered) == sorted(catalogue)
    for name, cls in registered.items():
        module, description = catalogue[name]
        assert cls.__module__ == module, name
        assert cls.description == description, name
    assert table.descriptions() == {n: c.description for n, c in sorted(table.classes.items())}


def test_the_codec_catalogue_names_each_type_s_module():
    registered = {n: type(codec.get_codec(n)).__module__ for n in codec.codec_names()}
    assert registered == builtins.CODECS


def test_a_method_and_a_format_registered_elsewhere_still_work(capsys):
    from quantbench.cli import main
    from quantbench.formats.base import Format
    from quantbench.quant.methods.base import Method

    @registry.register_method("toy_rtn")
    class Toy(Method):
        description = "a toy method registered outside quantbench"

    @registry.register_format("toy-layout")
    class ToyLayout(Format):
        description = "a toy layout registered outside quantbench"

    try:
        assert registry.get_method("toy_rtn") is Toy and "toy_rtn" in registry.method_names()
        assert registry.get_format("toy-layout") is ToyLayout
        assert METHODS.descriptions()["toy_rtn"] == Toy.description
        assert "gptq" in registry.method_names()  # the built-ins are there too
        capsys.readouterr()
        main(["list"])
        listed = capsys.readouterr().out
        assert "toy_rtn" in listed and "toy-layout" in listed and "a toy method" in listed
    finally:
        del METHODS.classes["toy_rtn"], FORMATS.classes["toy-layout"]


def test_naming_the_built_ins_imports_none_of_them():
    """``list`` and did-you-mean need names and descriptions only; a lookup imports the
    modules of its kind (and only those)."""
    code = ("import json, sys; from quantbench.registry import METHODS, FORMATS, get_format; "
            "names = sorted(METHODS.descriptions()) + sorted(FORMATS.descriptions()); "
            "before = sorted(m for m in sys.modules if m.startswith(('quantbench.quant.methods.', "
            "'quantbench.formats.'))); "
            "get_format('gptq'); "
            "after = sorted(m for m in sys.modules if m.startswith('quantbench.quant.methods.')); "
            "print(json.dumps([names, before, after, 'torch' in sys.modules]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names, before, after, torch_loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert names == sorted(builtins.METHODS) + sorted(builtins.FORMATS)
    assert before == [] and after == [] and not torch_loaded
