"""GGUF block types (ggml quantization types) as pure tensor codecs."""
