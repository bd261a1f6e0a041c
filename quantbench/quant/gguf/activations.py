"""How llama.cpp's CPU backend rounds the activations of a matmul with a quantized weight.

``ggml_mul_mat`` converts the float32 input rows to the weight type's ``vec_dot_type`` before
the dot products: Q8_0 blocks of 32 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1, Q8_K super-blocks
of 256 for the k-quants, fp16 for F16 weights. The dot product of the integer blocks equals the
dot product of the dequantized weight with the dequantized activations (up to summation order),
so ``fake_quantize(x, type) @ Wᵀ`` is what llama.cpp computes. Measured on the sample model
this accounts for llama-perplexity's perplexity sitting 0.3–1.1 % above a float32 matmul.
"""
from __future__ import annotations

from quantbench.lazy import torch

VEC_DOT_TYPE = {"Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "Q4_1": "Q8_1", "Q5_1": "Q8_1",
                "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K",
                "F16": "F16", "BF16": "BF16"}


def vec_dot_type(weight_type: str) -> str | None:
    """The activation type llama.cpp multiplies a ``weight_type`` weight with (None: float32)."""
    return VEC_DOT_TYPE.get(weight_type)


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q8_0`` (CPU, SIMD): d = amax/127 stored in fp16, q = round(x·127/amax)
    to nearest even."""
    blocks = x.reshape(-1, 32)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    d = amax / 127
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv)
    return (q * d.half().float()).reshape(x.shape)


def _q8_k(x: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q8_K``: per 256, the signed value of largest magnitude ``max``,
    iscale = −127/max, q = min(127, nearest(iscale·x)), d = 1/iscale in float32."""
    blocks = x.reshape(-1, 256)
    idx = blocks.abs().argmax(dim=1, keepdim=True)
    mx = blocks.gather(1, idx)
    zero = mx == 0
    iscale = torch.where(zero, torch.ones_like(mx), -127 / torch.where(zero, 1.0, mx))
    q = torch.round(blocks * iscale).clamp(max=127)
    d = torch.where(zero, torch.zeros_like(mx), 1 / iscale)
    return (q * d).reshape(x.shape)


def fake_quantize(x: torch.Tensor, act_type: str | None) -> torch.Tensor:
    """``x`` (float32, rows along the last dimension) as llama.cpp's matmul sees it."""
    if act_type is None:
        return x
    if act_type == "F16":
        return x.half().float()
    if act_type == "BF16":
        return x.bfloat16().float()
    if act_type == "Q8_K":
        return _q8_k(x.float())
    return _q8_0(x.float())  # Q8_0 and Q8_1 round the values alike
