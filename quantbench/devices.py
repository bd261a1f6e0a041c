"""Where the heavy maths runs: ``--device auto|cpu|cuda|cuda:N``."""
from __future__ import annotations

from quantbench.errors import ConfigError
from quantbench.lazy import torch

CPU = torch.device("cpu")


def resolve_device(name: "str | torch.device | None" = "auto") -> torch.device:
    """``auto`` (or None) picks the first CUDA GPU when torch sees one, else the CPU; naming a
    device that is not there is an error before any work starts."""
    if isinstance(name, torch.device):
        name = str(name)
    text = (name or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else CPU
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return CPU
    if device.type != "cuda":
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: torch {torch.__version__} sees no CUDA GPU here; "
                          "use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"--device {name}: only {count} CUDA device(s) (cuda:0..cuda:"
                          f"{count - 1})")
    return device


def describe(device: torch.device) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3)`` for manifests and logs."""
    if device.type != "cuda":
        return "cpu"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def to_device(value, device: torch.device):
    """Tensors inside nested tuples/lists/dicts moved to ``device`` (layer keyword arguments:
    attention masks, position ids, rotary (cos, sin))."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
