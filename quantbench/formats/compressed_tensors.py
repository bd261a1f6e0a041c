"""compressed-tensors pack-quantized format (being written)."""
