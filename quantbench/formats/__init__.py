"""Checkpoint formats, each a registered writer + reader (``quantbench/builtins.py`` imports
the built-ins so they register)."""
