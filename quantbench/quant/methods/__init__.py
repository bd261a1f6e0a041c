"""Quantization methods, each registered by name (``quantbench/builtins.py`` imports the
built-ins so they register)."""
