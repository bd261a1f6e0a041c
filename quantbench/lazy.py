"""Heavy libraries, imported where they are first used rather than where they are named.

Every quantbench module reaches torch, numpy and gguf-py through this module
(``from quantbench.lazy import torch``): the name is a stand-in that imports the real library on
its first attribute access (``torch.zeros``) and from then on holds the real module's names, so
it costs nothing after the first use. Importing quantbench code therefore loads neither library
(torch alone takes over a second), and the commands that compute nothing — ``--help``, ``list``,
``inspect``, a usage error — answer without them (``tests/test_fast_commands.py``).

What stays eager: a module-level expression that reads the library (a dtype as a default
argument, a ``torch.nn.Module`` base class) loads it when that module is imported; keep such
modules off the fast commands' imports. Annotations are strings (``from __future__ import
annotations``) and never load anything.
"""
from __future__ import annotations

import importlib
import types


class LazyModule(types.ModuleType):
    """A module object that imports ``name`` on its first attribute access and then takes on
    the real module's attributes (later lookups are plain dictionary reads); an attribute the
    library adds later is still found through the real module."""

    def __init__(self, name: str):
        super().__init__(name)
        self.__dict__["_lazy_real"] = None

    def __getattr__(self, attr: str):
        real = self.__dict__["_lazy_real"]
        if real is None:
            real = importlib.import_module(self.__name__)
            self.__dict__.update({k: v for k, v in vars(real).items()
                                  if k not in ("__name__", "__spec__", "__loader__")})
            self.__dict__["_lazy_real"] = real
        return getattr(real, attr)

    def __repr__(self) -> str:
        state = "loaded" if self.__dict__["_lazy_real"] is not None else "not loaded yet"
        return f"<lazy module {self.__name__!r} ({state})>"


torch = LazyModule("torch")
numpy = LazyModule("numpy")
gguf = LazyModule("gguf")  # gguf-py, llama.cpp's own library (imports numpy)
