"""How an evaluation runs, chosen by its estimated memory: whole models, or block-streamed.

The whole-model evaluator holds every model it compares in float32 at once (the baseline and
each candidate: ``models × 4 × parameters``). The streamed evaluator (``eval/streamed.py``)
holds one block, the embedding matrix or two heads (the baseline's and one candidate's), and
the windows' hidden states (three sets: the baseline's final ones, a candidate's current and
next), in memory or spilled to a temporary file. ``auto`` takes the whole-model mode when it
fits ``MEMORY_SHARE`` of the memory available now, else streams (hidden states in memory when
those fit, else spilled); an evaluation that cannot fit even streamed is refused saying which
setting to lower. ``eval --plan`` prints the estimate.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from quantbench.calibration.plan import RUNTIME_BASE_BYTES
from quantbench.errors import EvalError, ModelLoadError
from quantbench.eval.sources import EvalSource
from quantbench.lazy import torch
from quantbench.models.arch import arch_of

if TYPE_CHECKING:
    from quantbench.models.arch import ArchSpec

STREAM_CHOICES = ("auto", "on", "off")
MEMORY_SHARE = 0.8               # of MemAvailable an evaluation may plan to use
HEAD_BUFFERS = 4                  # a chunk's logits: baseline and candidate log-probs, KL terms


def available_memory() -> int:
    """Bytes the kernel says a new allocation can get now (``MemAvailable``)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@dataclass
class EvalEstimate:
    """Peak memory of each mode, bytes; ``mode``/``spill``: what runs."""

    mode: str            # whole | streamed
    spill: bool          # streamed hidden states in a temporary file
    models: int
    parameters: int      # per model
    tokens: int          # windows × ctx
    whole_bytes: int
    streamed_bytes: int  # hidden states in memory
    spilled_bytes: int   # hidden states on disk (their size: spill_file_bytes)
    spill_file_bytes: int
    available_bytes: int
    gflop: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _arch(source: EvalSource) -> "ArchSpec | None":
    """The model's layout, or None where quantbench has none (a ``trust_remote_code`` model:
    it runs whole only)."""
    try:
        return arch_of(source.config)
    except ModelLoadError:
        return None


def estimate(source: EvalSource, models: int, windows: int, ctx: int, batch_size: int,
             stream: str = "auto", available: int | None = None,
             chunk_rows: Callable[[int], int] = lambda vocab: 1) -> EvalEstimate:
    """The estimate for ``models`` models like ``source`` (the baseline and its candidates:
    one architecture) over ``windows`` windows of ``ctx`` tokens; ``stream`` as
    ``quantbench eval --stream`` (auto on a GPU: whole only when the models fit its free
    memory too). ``chunk_rows(vocab)``: positions whose logits the head makes at once
    (``evaluator.chunk_rows``)."""
    if stream not in STREAM_CHOICES:
        raise EvalError(f"--stream must be one of {', '.join(STREAM_CHOICES)}, got {stream!r}")
    arch = _arch(source)
    hp = arch.hparams(source.config) if arch else source.config
    hidden = int(hp.get("hidden_size", 0))
    vocab = int(hp.get("vocab_size", 0))
    inter = max(int(hp.get(k) or 0) for k in ("intermediate_size", "moe_intermediate_size",
                                              "hidden_size"))
    params = sum(source.sizes.values())
    blocks = {}
    for name, n in source.sizes.items():
        index = arch.block_of(name) if arch else None
        if index is not None:
            blocks[index] = blocks.get(index, 0) + n
    block = max(blocks.values(), default=params)
    matrix = vocab * hidden  # the embedding or one head
    tokens = windows * ctx
    chunk = HEAD_BUFFERS * chunk_rows(max(vocab, 1)) * 4 * vocab
    act = batch_size * ctx * (3 * hidden + 2 * inter) * 4 * 2  # one block's transient work
    whole = RUNTIME_BASE_BYTES + models * 4 * params + models * batch_size * ctx * hidden * 4 \
        + act + chunk
    store = tokens * hidden * 4
    stores = (3 if models > 1 else 2) * store  # baseline's final, a candidate's current + next
    held = RUNTIME_BASE_BYTES + 2 * 4 * block + max(4 * matrix, 2 * 4 * matrix * (models > 1)) \
        + act + chunk
    streamed = held + stores
    spilled = held + 3 * batch_size * ctx * hidden * 4
    available = available_memory() if available is None else available
    budget = MEMORY_SHARE * available
    fits = whole <= budget and device_fits(source, models)
    if stream == "off" or (stream == "auto" and (arch is None or fits)):
        mode, spill = "whole", False
    else:
        if arch is None:
            raise EvalError("this model's layout is unknown to quantbench (a trust_remote_code "
                            "model), so it cannot be evaluated block by block: use --stream off")
        mode, spill = "streamed", streamed > budget
        if spill and spilled > budget:
            raise EvalError(
                f"this evaluation needs about {_gib(spilled)} even block-streamed with its "
                f"hidden states on disk, {_gib(available)} is available (the runtime "
                f"{_gib(RUNTIME_BASE_BYTES)}, one block "
                f"{_gib(8 * block)} and two vocabulary heads {_gib(8 * matrix)} must fit; "
                f"lower --ctx for the activations, {_gib(act)}, or QUANTBENCH_LOGITS_MB for "
                f"the logits chunk, {_gib(chunk)}), or free memory")
        if spill:
            _check_spill_room(stores, tokens)
    flop = 2 * (params - 2 * matrix) * tokens * models + 2 * matrix * tokens * (
        2 * models - 1 if mode == "streamed" else models)
    return EvalEstimate(mode, spill, models, params, tokens, int(whole), int(streamed),
                        int(spilled), stores if spill else 0,
                        int(available), flop / 1e9)


def _check_spill_room(need: int, tokens: int) -> None:
    import tempfile

    from quantbench.diskspace import free_bytes

    folder = tempfile.gettempdir()
    free = free_bytes(Path(folder))
    if free is not None and need > free:
        raise EvalError(f"the hidden states of {tokens:,} tokens do not fit in memory and need "
                        f"{_gib(need)} of spill space in {folder}, {_gib(free)} is free: set "
                        "TMPDIR to a disk with room, or lower --max-tokens or --windows")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def device_fits(source: EvalSource, models: int) -> bool:
    """Whether ``models`` float32 models fit the free memory of ``source.device`` (a GPU);
    True on the CPU (decided by :func:`estimate`)."""
    device = source.device
    if device is None or device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return models * 4 * sum(source.sizes.values()) <= MEMORY_SHARE * free


def choose(baseline: Any, models: int, windows: "torch.Tensor", batch_size: int,
           stream: "str | bool", chunk_rows: Callable[[int], int]) -> EvalEstimate | None:
    """How ``evaluate`` runs: None for the whole-model mode without an estimate (``stream``
    False, or a baseline that is not an ``EvalSource``: a scripted model), else the estimate
    that decides (``stream`` True: streamed, spilling only when the hidden states do not
    fit)."""
    if stream is False or not isinstance(baseline, EvalSource):
        return None
    choice = "on" if stream is True else stream
    return estimate(baseline, models, len(windows), windows.shape[1], batch_size, choice,
                    chunk_rows=chunk_rows)
