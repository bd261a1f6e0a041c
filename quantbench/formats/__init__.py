"""Checkpoint formats, each a registered writer + reader (importing registers them)."""
from quantbench.formats import compressed_tensors, dense  # noqa: F401
