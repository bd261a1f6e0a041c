"""Block-streamed evaluation: a model run over every window one decoder block at a time.

The whole-model evaluator holds each model in float32 at once (a 7B model: 28 GB). Here the
windows go through the model the way the calibration pipeline walks it (``calibration/
blocks.py``): the embeddings of every window, then block 0 over all of them, then block 1, ...,
each block read from the checkpoint or artifact (dequantized through its format's reader, with
its run-time modules) just before it runs and freed after it; then the final norm. What stays
is the last hidden states of the windows (``H`` floats per token) and the vocabulary head,
which the evaluator applies a chunk of positions at a time (``evaluator.chunk_rows``). Peak
memory: one block + the embedding or head matrix + two sets of the windows' hidden states +
one chunk of logits, whatever the number of layers.

The hidden states live in a :class:`HiddenStore`: a tensor in memory, or — when they do not fit
— a spill file read and written with explicit I/O (not a memory map: pages of a mapped file
count toward the process's resident memory until the kernel evicts them, so a mapped spill
would not bound what is measured, only what is needed).

Every operation is the model's own module run on the same micro-batches with the arguments its
forward makes (captured by ``capture_layer_inputs``), so the results equal the whole-model
evaluator's to float noise (bit for bit on the CPU in our tests).
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Callable

from quantbench import tempfiles
from quantbench.calibration.blocks import capture_layer_inputs, materialize, skeleton_for
from quantbench.calibration.memory import heap_for_temporaries, pin_mmap_threshold
from quantbench.devices import CPU
from quantbench.errors import EvalError
from quantbench.eval.sources import EvalSource
from quantbench.lazy import torch
from quantbench.models.arch import ArchSpec, arch_of

SPILL_PREFIX = "quantbench-eval-spill-"


class HiddenStore:
    """``[N, T, H]`` float32 hidden states of the evaluation windows, in memory or in a spill
    file (``folder``): written and read a run of whole windows at a time."""

    def __init__(self, shape: tuple[int, int, int], folder: Path | None = None):
        self.shape, self.path = shape, None
        self.window_bytes = shape[1] * shape[2] * 4
        if folder is None:
            self.data: "torch.Tensor | None" = torch.empty(shape, dtype=torch.float32)
            return
        self.data = None
        fd, self.path = tempfiles.make_file(folder, "hidden-")
        self.fd = fd
        os.ftruncate(fd, shape[0] * self.window_bytes)

    def write(self, first: int, values: "torch.Tensor") -> None:
        values = values.detach().to(CPU, torch.float32).contiguous()
        if self.data is not None:
            self.data[first:first + len(values)] = values
            return
        view = memoryview(values.numpy()).cast("B")
        offset = first * self.window_bytes
        try:
            while view:  # pwrite may write less than asked
                done = os.pwrite(self.fd, view, offset)
                view, offset = view[done:], offset + done
        except OSError as exc:  # a full disk: say where, and what to change
            raise EvalError(f"cannot write the evaluation's spilled hidden states to "
                            f"{self.path} ({exc.strerror or exc}): set TMPDIR to a disk with "
                            "room, or lower --max-tokens or --windows") from None

    def read(self, first: int, count: int) -> "torch.Tensor":
        if self.data is not None:
            return self.data[first:first + count]
        out = torch.empty((count, *self.shape[1:]), dtype=torch.float32)
        view = memoryview(out.numpy()).cast("B")
        offset = first * self.window_bytes
        while view:
            done = os.preadv(self.fd, [view], offset)
            if done <= 0:
                raise OSError(f"spill file {self.path} ended early")
            view, offset = view[done:], offset + done
        return out

    def close(self) -> None:
        self.data = None
        if self.path is not None:
            os.close(self.fd)
            self.path.unlink(missing_ok=True)
            self.path = None


class Stores:
    """Makes the :class:`HiddenStore` s of an evaluation: in memory, or spilled to one private
    folder (``spill``: the system's temporary directory, or the folder given) that
    :meth:`close` removes, as does the next evaluation after a kill."""

    def __init__(self, spill: "bool | Path" = False):
        self.folder: Path | None = None
        if spill:
            root = Path(tempfile.gettempdir()) if spill is True else Path(spill)
            tempfiles.sweep(root, SPILL_PREFIX)
            self.folder = tempfiles.make_dir(root, SPILL_PREFIX)

    def new(self, shape: tuple[int, int, int]) -> HiddenStore:
        return HiddenStore(shape, self.folder)

    def close(self) -> None:
        if self.folder is not None:
            tempfiles.remove(self.folder)
            self.folder = None


class _Sink:
    """``append`` target for the captured block-0 inputs: each micro-batch written to a store."""

    def __init__(self, store: HiddenStore):
        self.store, self.next = store, 0

    def append(self, hidden: "torch.Tensor") -> None:
        self.store.write(self.next, hidden)
        self.next += len(hidden)


class StreamedLM:
    """A model evaluated block by block: :meth:`run` leaves the final hidden states of every
    window in ``self.final``; :meth:`head` is its vocabulary head (as ``CausalLM.head``);
    :meth:`close` frees both (and a spilled file), after a failure too."""

    def __init__(self, source: EvalSource):
        self.source = source
        self.arch: ArchSpec = arch_of(source.config)
        self.device = source.device or CPU
        self.skeleton = skeleton_for(source.config, self.arch)
        config = self.skeleton.config
        self.softcap = config.to_dict().get("final_logit_softcapping")
        self.vocab_size = int(config.get_text_config().vocab_size)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.final: HiddenStore | None = None
        self._head: "torch.nn.Module | None" = None

    def _load(self, path: str) -> "torch.nn.Module":
        """The module at ``path`` of the skeleton on the device, its weights read, run-time
        modules swapped in (the skeleton keeps it until :meth:`_free`)."""
        names = [n for n in self.source.names if n.startswith(f"{path}.")]
        materialize(self.skeleton, path, self.source.read(names), self.device)
        return self._runtime(path)

    def _runtime(self, path: str) -> "torch.nn.Module":
        """The module at ``path`` with the format's run-time modules swapped in, all on the
        device (a swapped-in module is built where its tensors were read)."""
        self.source.runtime(self.skeleton, path)
        return self.skeleton.get_submodule(path).to(self.device).eval()

    def _free(self, path: str) -> None:
        self.skeleton.get_submodule(path).to("meta")

    def run(self, windows: "torch.Tensor", batch_size: int, stores: Stores,
            step: Callable[[str], None]) -> None:
        """Every window through the embeddings, each block in turn and the final norm;
        ``step(label)`` after each stage (a progress bar's advance). Large tensors get mappings
        of their own (``calibration/memory.py``): a block's weights freed on the heap would
        stay resident, and the peak would grow with the number of blocks."""
        pin_mmap_threshold()
        arch, shape = self.arch, (len(windows), windows.shape[1], self._hidden_size())
        self.final = current = stores.new(shape)  # closed by close(), also after a failure
        embed = dict(self.source.read([f"{arch.embed}.weight"]))[f"{arch.embed}.weight"]
        captured = capture_layer_inputs(arch, self.skeleton, embed, windows, batch_size,
                                        self.device, _Sink(current))
        del embed
        step("embeddings")
        batches = [(first, min(batch_size, len(windows) - first))
                   for first in range(0, len(windows), batch_size)]
        blocks = len(captured.layer_kwargs)
        for index in range(blocks):
            path = f"{arch.block_prefix}.{index}"
            layer = self._load(path)
            nxt = stores.new(shape)
            try:
                with torch.inference_mode(), heap_for_temporaries():
                    for (first, count), kwargs in zip(batches, captured.layer_kwargs[index]):
                        out = layer(current.read(first, count).to(self.device), **kwargs)
                        nxt.write(first, out[0] if isinstance(out, tuple) else out)
            except BaseException:
                nxt.close()
                raise
            self._free(path)
            current.close()
            self.final = current = nxt
            step(f"block {index + 1}/{blocks}")
        norm = self._load(arch.final_norm)
        with torch.inference_mode():
            for first, count in batches:
                current.write(first, norm(current.read(first, count).to(self.device)))
        self._free(arch.final_norm)

    def _hidden_size(self) -> int:
        return int(self.skeleton.get_submodule(self.arch.embed).weight.shape[1])

    def load_head(self) -> None:
        """The vocabulary head on the device (the embedding matrix when tied)."""
        weight = f"{self.arch.lm_head}.weight"
        if self.tied or weight not in self.source.names:  # the embedding matrix, renamed
            embed = self.source.read([f"{self.arch.embed}.weight"])
            materialize(self.skeleton, self.arch.lm_head,
                        ((weight, t) for _, t in embed), self.device)
            self._head = self._runtime(self.arch.lm_head)
        else:
            self._head = self._load(self.arch.lm_head)

    def rows(self, first: int, count: int, scored: int) -> "torch.Tensor":
        """Final hidden states of windows ``first .. first+count-1`` at the scored positions
        (``scored`` .. T-2), ``[n, H]`` windows in order, on the device."""
        hidden = self.final.read(first, count)
        return hidden[:, scored:-1].reshape(-1, hidden.shape[-1]).to(self.device)

    def head(self, hidden: "torch.Tensor") -> "torch.Tensor":
        with torch.inference_mode():
            logits = self._head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()

    def close(self) -> None:
        if self.final is not None:
            self.final.close()
            self.final = None
        if self._head is not None:
            self._free(self.arch.lm_head)
            self._head = None


def timed_run(lm: StreamedLM, windows: "torch.Tensor", batch_size: int, stores: Stores,
              step: Callable[[str], None], seconds: dict[str, float], name: str) -> None:
    """:meth:`StreamedLM.run` and its head loaded, the time added to ``seconds[name]``."""
    start = time.perf_counter()
    lm.run(windows, batch_size, stores, step)
    lm.load_head()
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)
    seconds[name] += time.perf_counter() - start
