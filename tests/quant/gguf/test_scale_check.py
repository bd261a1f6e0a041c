"""A GGUF block decodes to NaN/Inf exactly when one of its float16 scale fields is non-finite:
``BlockCodec.non_finite_blocks`` reads only those fields, and must agree with a full decode
block for block, on every registered type (random bytes hit NaN/Inf scales often enough)."""
from __future__ import annotations

import pytest
import torch

import quantbench  # noqa: F401  (registers the built-in codecs)
from quantbench.quant.gguf.codec import codec_names, get_codec


@pytest.mark.parametrize("name", codec_names())
def test_scale_fields_decide_finiteness(name):
    codec = get_codec(name)
    gen = torch.Generator().manual_seed(7)
    blocks = torch.randint(0, 256, (4096, codec.type_size), dtype=torch.uint8, generator=gen)
    decoded = ~torch.isfinite(codec.dequantize(blocks)).all(dim=1)
    assert decoded.any() and not decoded.all()  # both kinds of block were drawn
    assert torch.equal(codec.non_finite_blocks(blocks), decoded)


def test_every_quantized_type_reads_only_its_scales():
    """The float types decode (a value is its own scale); every block type names its fields."""
    for name in codec_names():
        codec = get_codec(name)
        assert (codec.scale_offsets is None) == (codec.block_size == 1), name
