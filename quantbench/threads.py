"""Thread settings for work made of many small torch ops."""
from __future__ import annotations

import torch


class single_threaded:
    """Context manager: torch ops in this thread without intra-op threads, restored after.

    On the CPU a loop of small ops (a GPTQ column step, a GGUF block search chunk) runs
    faster on one thread: with more, every op pays a thread-pool synchronisation, which on a
    busy machine waits for a descheduled thread. A CUDA ``device`` leaves the settings alone."""

    def __init__(self, device: "torch.device | str | None" = None) -> None:
        self.active = device is None or torch.device(device).type == "cpu"
        self.threads = 1

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        if self.active and self.threads > 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        if self.active and self.threads > 1:
            torch.set_num_threads(self.threads)
