"""Imports flow one way: no import cycle anywhere in the package, deferred imports included.

The graph is read from the source with ``ast``: every ``import`` / ``from ... import`` statement,
at module level or inside a function (a deferred import that closes a loop is still a loop;
only imports under ``if TYPE_CHECKING:`` are left out, they never run). ``import a.b.c`` also
depends on the packages ``a`` and ``a.b`` (their ``__init__`` runs first), except on the
importing module's own parent packages. The registries never import their entries: the
built-in methods, formats and GGUF codecs are declared to them by one top module,
``quantbench/builtins.py`` (a catalogue: name → module), with a loader that imports those
modules by name (``importlib``, so not an edge of this graph) the first time a lookup needs a
class — by then the registry is fully imported, and an entry importing it closes no loop; an
entry that imported ``quantbench.builtins`` would, and is caught here.

And no module imports a heavy library (torch, numpy, transformers, gguf-py) when it is
imported: they are named through ``quantbench/lazy.py`` or imported in the functions using
them, so the commands that compute nothing stay fast (``tests/test_fast_commands.py``).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import quantbench

PACKAGE = Path(quantbench.__file__).parent
ROOT = PACKAGE.parent


def _modules(package: Path) -> dict[str, Path]:
    mods = {}
    for path in package.rglob("*.py"):
        name = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every module name an import statement of ``tree`` may load, wherever the statement is."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph(package: Path) -> dict[str, set[str]]:
    """``{module: the package's modules it imports}``, with the parent-package edges."""
    mods = _modules(package)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name in _imported_names(tree, module, path.name == "__init__.py"):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in mods and target != module and not module.startswith(target + "."):
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _describe(graph: dict[str, set[str]], component: list[str]) -> str:
    members = set(component)
    return f"{len(component)} modules: " + "; ".join(
        f"{m} -> {', '.join(sorted(graph[m] & members))}" for m in component)


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 50 and "quantbench.builtins" in graph
    found = cycles(graph)
    assert not found, "import cycles (module -> the modules of its cycle it imports):\n" + \
        "\n".join(_describe(graph, c) for c in found)


def test_the_checker_sees_deferred_and_parent_package_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import c\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from pkg import d\n"
                              "def f():\n    from . import b\n")
    (pkg / "b.py").write_text("import pkg.a\n")
    (pkg / "sub" / "c.py").write_text("")
    (pkg / "d.py").write_text("import pkg.sub.c\nimport pkg.a\n")
    (pkg / "sub" / "e.py").write_text("from .. import d\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b"}  # the deferred import counts, TYPE_CHECKING does not
    assert graph["pkg.sub.c"] == set() and graph["pkg.sub"] == {"pkg.sub.c"}
    assert graph["pkg.d"] == {"pkg.sub", "pkg.sub.c", "pkg.a"}  # the parent package too
    assert graph["pkg.sub.e"] == {"pkg.d"}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_registration_does_not_depend_on_import_order():
    """The registries fill from ``quantbench/builtins.py`` whichever module is imported first
    (``quantbench/__init__.py`` declares the built-ins before any submodule runs)."""
    code = ("import quantbench.registry; from quantbench.registry import get_method, get_format; "
            "get_method('gptq'); get_format('gguf'); "
            "from quantbench.quant.gguf.codec import get_codec; get_codec('Q2_K'); "
            "get_codec('Q4_0')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


HEAVY = ("torch", "numpy", "transformers", "safetensors.torch", "gguf")
# gguf-py's value types name the metadata of a GGUF: these modules are imported only where a
# GGUF is read or written (``formats/gguf.py`` imports them in its functions)
GGUF_MODULES = {"quantbench.formats.gguf_check", "quantbench.formats.gguf_kv",
                "quantbench.formats.gguf_meta", "quantbench.formats.gguf_special",
                "quantbench.formats.gguf_vocab"}


def _module_level_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, module)`` of every import that runs when the module is imported: outside
    functions and ``if TYPE_CHECKING:`` (class bodies run at import too)."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.append((node.lineno, node.module or ""))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_no_module_imports_a_heavy_library_when_imported():
    """torch, numpy, transformers and safetensors' torch bindings are imported where they are
    used (``quantbench/lazy.py``), so importing any part of quantbench — and every command that
    computes nothing — stays cheap (``tests/test_fast_commands.py`` runs those commands)."""
    offenders = []
    for module, path in _modules(PACKAGE).items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, name in _module_level_imports(tree):
            heavy = next((h for h in HEAVY if name == h or name.startswith(h + ".")), None)
            if heavy and not (heavy == "gguf" and module in GGUF_MODULES):
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not offenders, "import these in the functions that use them, or name them " \
        "through quantbench.lazy:\n" + "\n".join(offenders)
