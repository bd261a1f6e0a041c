"""EXL2 (exllamav2): the mixed-width grid (``grid``), GPTQ on it (``gptq``), the candidate
settings (``presets``), the per-block measurement (``measure``) and the bit-allocation
solver (``optimize``). FORMATS.md §4 has the on-disk layout; ``formats/exl2.py`` packs it."""
