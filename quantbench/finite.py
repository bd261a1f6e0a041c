"""NaN/Inf detection shared by the weight readers, the quantizers' output guard and the
calibration walk: pure tensor functions, no state."""
from __future__ import annotations

from quantbench.lazy import torch

def _float8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def count_non_finite(tensor: torch.Tensor) -> int:
    """How many NaN/±Inf values a tensor holds (0 for integer tensors). A float32 sum is
    finite only when every value is (NaN and Inf propagate through any summation order), so
    the exact count is taken only when the sum is not."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    if _float8(tensor.dtype):
        tensor = tensor.float()
    acc = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(torch.sum(tensor, dtype=acc))):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def describe_non_finite(tensor: torch.Tensor) -> str:
    """``3 NaN, 1 +Inf`` for a message."""
    t = tensor.float() if _float8(tensor.dtype) else tensor
    counts = (("NaN", int(torch.isnan(t).sum())), ("+Inf", int(torch.isposinf(t).sum())),
              ("-Inf", int(torch.isneginf(t).sum())))
    return ", ".join(f"{n} {kind}" for kind, n in counts if n)
