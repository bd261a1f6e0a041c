import pytest
import torch

from quantbench.formats.packing import (pack_bits_lsb_cols, pack_bits_lsb_rows,
                                        unpack_bits_lsb_cols, unpack_bits_lsb_rows)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 32, 33, 100])
def test_round_trip(bits, n):
    codes = torch.randint(0, 1 << bits, (5, n), dtype=torch.uint8)
    packed = pack_bits_lsb_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-n * bits // 32))
    assert torch.equal(unpack_bits_lsb_rows(packed, bits, n), codes)
    assert torch.equal(unpack_bits_lsb_cols(pack_bits_lsb_cols(codes.t(), bits), bits, n),
                       codes.t())


def test_known_4bit_layout_and_sign_bit():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15, 9]], dtype=torch.uint8)
    packed = pack_bits_lsb_rows(codes, 4)
    assert packed.shape == (1, 2)
    assert int(packed[0, 0]) & 0xFFFFFFFF == 0xF7654321  # element k at bits 4*(k%8)
    assert int(packed[0, 0]) < 0  # top bit set survives as a negative int32
    assert int(packed[0, 1]) == 9


def test_3bit_straddles_words():
    codes = torch.full((1, 11), 7, dtype=torch.uint8)  # element 10 spans bits 30..32
    packed = pack_bits_lsb_rows(codes, 3)
    assert int(packed[0, 0]) & 0xFFFFFFFF == 0xFFFFFFFF and int(packed[0, 1]) == 1


@pytest.mark.parametrize("bits", range(2, 9))
def test_equals_compressed_tensors_pack(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    codes = torch.randint(0, 1 << bits, (6, 70), dtype=torch.uint8)
    signed = (codes.to(torch.int32) - (1 << (bits - 1))).to(torch.int8)
    assert torch.equal(pack_bits_lsb_rows(codes, bits), helpers.pack_to_int32(signed, bits))
    assert torch.equal(pack_bits_lsb_cols(codes, bits),
                       helpers.pack_to_int32(signed, bits, packed_dim=0))
