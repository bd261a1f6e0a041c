"""Grids as registered objects, one module each: the integer grid (``int``), the NF4/FP4
codebooks (``codebook``), LLM.int8 rows (``int8_row``), GGUF block types (``gguf``) and EXL2
mixes (``exl2``). Importing this package registers every built-in kind; ``base`` has the
contract (:class:`Grid`), :func:`register_grid` and :func:`grid_from_dict`."""
from __future__ import annotations

from quantbench.quant.grids.base import (CONFIG_VERSION, GRIDS, Grid, check_version,
                                         grid_from_dict, register_grid, scale_dtype_for)
from quantbench.quant.grids.codebook import BNB_BLOCK_SIZES, CODEBOOKS, CodebookGridConfig
from quantbench.quant.grids.exl2 import EXL2_WIDTHS, EXL2GridConfig
from quantbench.quant.grids.gguf import GGUF_MIXTURES, GGUF_TENSOR_TYPES, GGUFGridConfig
from quantbench.quant.grids.int import GRANULARITIES, IntGridConfig
from quantbench.quant.grids.int8_row import Int8RowGridConfig

GridConfig = Grid   # any registered grid (the name configs and methods annotate with)

__all__ = ["BNB_BLOCK_SIZES", "CODEBOOKS", "CONFIG_VERSION", "EXL2_WIDTHS", "GGUF_MIXTURES",
           "GGUF_TENSOR_TYPES", "GRANULARITIES", "GRIDS", "CodebookGridConfig",
           "EXL2GridConfig", "GGUFGridConfig", "Grid", "GridConfig", "Int8RowGridConfig",
           "IntGridConfig", "check_version", "grid_from_dict", "register_grid",
           "scale_dtype_for"]
