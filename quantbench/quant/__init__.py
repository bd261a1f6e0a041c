"""Grids (pure maths) and methods (registered by name in quant.methods)."""
