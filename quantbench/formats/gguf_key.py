"""The :class:`KV` record of one GGUF key/value, in a leaf module (no quantbench imports) so the
architecture families (``models/families/``, imported by ``models/arch.py``) can build their
keys without an import cycle through :mod:`quantbench.formats.gguf_kv`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KV:
    """One GGUF key/value; arrays carry their element type in ``sub_type``.

    Write it with ``GGUFWriter.add_key_value(kv.key, kv.value, kv.vtype, sub_type=kv.sub_type)``.
    """
    key: str
    value: Any
    vtype: Any  # gguf.GGUFValueType
    sub_type: Any = None
