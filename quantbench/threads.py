"""Threads for work made of many small torch ops (GGUF block searches, GPTQ column sweeps).

On the CPU such loops run faster as independent chunks on worker threads whose torch ops are
single-threaded than on torch's own intra-op threads, which synchronise at every small op
(tens of times slower when the cores are shared with other processes)."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from quantbench.lazy import torch


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


MAX_WORKERS = 8  # Python dispatches every op under the GIL: more threads stop paying off
_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (workers, pool)
_POOL_LOCK = threading.Lock()
_LOCAL = threading.local()


def _init_worker() -> None:
    torch.get_num_threads()       # torch's per-thread setup first, or it would undo the next
    torch.set_num_threads(1)      # line at the worker's first op
    _LOCAL.worker = True


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != workers:
            if _POOL is not None:
                _POOL[1].shutdown(wait=False)
            _POOL = (workers, ThreadPoolExecutor(workers, "quantbench-worker",
                                                 initializer=_init_worker))
        return _POOL[1]


def run_chunks(fn: Callable[[int], None], starts: Iterable[int]) -> None:
    """``fn(start)`` for every start, on ``torch.get_num_threads()`` (at most
    :data:`MAX_WORKERS`) worker threads whose torch ops are single-threaded (torch and numpy
    release the GIL in their kernels, so the chunks run side by side); inline, single-threaded,
    when one thread is asked for, for a single chunk, or when called from a worker."""
    starts = list(starts)
    threads = torch.get_num_threads()
    if threads <= 1 or len(starts) <= 1 or getattr(_LOCAL, "worker", False):
        with single_threaded():
            for start in starts:
                fn(start)
        return
    try:
        pool = _pool(min(threads, MAX_WORKERS))
        for future in [pool.submit(fn, start) for start in starts]:
            future.result()
    finally:
        # a worker's set_num_threads(1) also sets torch's default for threads started later;
        # put the caller's count back there (its own count is unchanged)
        torch.set_num_threads(threads)
