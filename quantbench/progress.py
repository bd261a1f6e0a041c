"""Progress of long loops where the user sees it, and nothing where it would not be read.

Where it goes, chosen when a loop starts:

- a terminal (stderr is a TTY): rich's live bar, redrawn in place;
- a Jupyter notebook: a tqdm bar (its widget when ``ipywidgets`` is installed, else its text
  line, which the notebook redraws in place);
- anything else (a CI log, ``| tee``, a subprocess's pipe): one plain line per step, e.g.
  ``gptq 4-bit g128 → dense: 12/30 blocks  elapsed 0:41  eta 1:02`` — never redrawn, never cut,
  no ANSI codes, and at most one line every ``PLAIN_INTERVAL_S`` seconds besides the first and
  the last step, so a log stays bounded however long the run.

``QUANTBENCH_PROGRESS`` overrides the choice for the whole process (and the subprocesses it
starts), which is why it is an environment variable and not only a parameter: ``auto`` (the
default, as above), ``off`` (or ``0``: nothing), ``plain`` (the plain lines even in a terminal),
``bar`` (rich's bar even where stderr is no terminal). The Python API's ``progress=`` decides
per call: ``None`` (the default) follows the variable, ``False`` is silent, ``True`` shows
progress even when the variable says ``off``. A failed loop leaves its error line alone: the
live bar is removed, and no plain line is printed after the failure.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Iterator, Protocol

from quantbench.errors import ConfigError

ENV = "QUANTBENCH_PROGRESS"
PLAIN_INTERVAL_S = 5.0
MODES = ("auto", "off", "plain", "bar")
_ALIASES = {"": "auto", "1": "auto", "on": "auto", "true": "auto", "yes": "auto",
            "0": "off", "false": "off", "no": "off", "none": "off"}


class Step(Protocol):
    def __call__(self, label: str = "", advance: int = 1) -> None: ...


def env_mode() -> str:
    """``QUANTBENCH_PROGRESS`` as one of ``MODES``; another value is refused in one line."""
    raw = os.environ.get(ENV, "auto")
    mode = _ALIASES.get(raw.strip().lower(), raw.strip().lower())
    if mode not in MODES:
        raise ConfigError(f"{ENV}={raw!r} is not a progress mode; use one of "
                          f"{', '.join(MODES)} (0 = off)")
    return mode


def progress_mode(enabled: bool | None = None) -> str:
    """Where progress goes now: ``off``, ``bar``, ``notebook`` or ``plain`` (see the module)."""
    mode = env_mode()
    if enabled is False or (enabled is None and mode == "off"):
        return "off"
    if mode in ("plain", "bar"):
        return mode
    if in_notebook():
        return "notebook"
    return "bar" if _stderr_is_terminal() else "plain"


def in_notebook() -> bool:
    """A Jupyter kernel (notebook, lab, VS Code, Colab) runs this code."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and any(c.__name__ == "ZMQInteractiveShell"
                                     for c in type(shell).__mro__)


def _stderr_is_terminal() -> bool:
    """A terminal that can redraw a line in place (not a pipe, a file or a dumb terminal)."""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


@contextlib.contextmanager
def block_progress(total: int, description: str, enabled: bool | None = None,
                   unit: str = "") -> Iterator[Step]:
    """Yield ``step(label="", advance=1)``: each call adds ``advance`` to the count (out of
    ``total`` ``unit``) and shows ``label`` beside it; ``enabled`` as the API's ``progress=``."""
    mode = progress_mode(enabled)
    if mode == "off":
        yield lambda label="", advance=1: None
        return
    display = {"bar": _Bar, "notebook": _Notebook, "plain": _Plain}[mode](total, description,
                                                                         unit)
    try:
        yield display.step
    except BaseException:
        display.close(failed=True)
        raise
    display.close(failed=False)


def clock(seconds: float) -> str:
    """``0:41``, ``12:05``, ``1:02:03``."""
    s = int(max(seconds, 0.0) + 0.5)
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def status(done: int, total: int, unit: str, label: str, elapsed: float,
           remaining: float | None) -> str:
    """``12/30 blocks  elapsed 0:41  eta 1:02``: the count, what it counts, the step's label,
    the time so far and, while not done and once it can be told, the time left."""
    text = f"{done}/{total}" + (f" {unit}" if unit else "") + (f" {label}" if label else "")
    text += f"  elapsed {clock(elapsed)}"
    if done < total and remaining is not None:
        text += f"  eta {clock(remaining)}"
    return text


class _Plain:
    """One line per step, rate-limited: the first step, then at most one every ``interval``
    seconds, and the last; the ETA extrapolates the mean pace since the count began."""

    def __init__(self, total: int, description: str, unit: str,
                 write: Callable[[str], None] | None = None,
                 clock_fn: Callable[[], float] = time.monotonic,
                 interval: float = PLAIN_INTERVAL_S):
        self.total, self.description, self.unit = total, description, unit
        self._write = write or _stderr_line
        self._now = clock_fn
        self.interval = interval
        self.start = self.counting_since = clock_fn()
        self.done = 0
        self.last_line: float | None = None

    def step(self, label: str = "", advance: int = 1) -> None:
        now = self._now()
        if self.done == 0 and advance == 0:  # a step before the count: the pace starts after it
            self.counting_since = now
        self.done += advance
        last = self.done >= self.total
        if self.last_line is None or last or now - self.last_line >= self.interval:
            self.last_line = now
            self._write(self.line(label, now))

    def line(self, label: str, now: float) -> str:
        remaining = None
        if self.done:
            remaining = (now - self.counting_since) / self.done * (self.total - self.done)
        return f"{self.description}: " + status(self.done, self.total, self.unit, label,
                                                now - self.start, remaining)

    def close(self, failed: bool) -> None:
        pass  # every line is already out; after a failure nothing is added to the error


def _stderr_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)  # the stream at the time: pytest swaps it


class _Bar:
    """rich's live display on stderr, one line per loop: the description, a bar in the width
    the text leaves, and the same status as a plain line. The text is never cut for the bar:
    the bar shrinks and goes; at a width the text alone exceeds, the status gets its own line.
    A failed loop's display is removed."""

    def __init__(self, total: int, description: str, unit: str):
        from rich.console import Console
        from rich.progress import Progress

        class LineProgress(Progress):
            def get_renderables(self):
                for task in self.tasks:
                    yield _BarLine(task)

        self.progress = LineProgress(console=Console(stderr=True), transient=False)
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, unit=unit, label="")

    def step(self, label: str = "", advance: int = 1) -> None:
        self.progress.update(self.task, advance=advance, label=label)

    def close(self, failed: bool) -> None:
        if failed:
            self.progress.live.transient = True  # a failed run leaves its error line alone
        self.progress.stop()


class _BarLine:
    """One task of :class:`_Bar`, laid out for the width it is drawn at."""

    MIN_BAR = 6

    def __init__(self, task):
        self.task = task

    def __rich_console__(self, console, options):
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        t = self.task
        text = status(int(t.completed), int(t.total or 0), t.fields["unit"], t.fields["label"],
                      t.finished_time or t.elapsed or 0.0, t.time_remaining)
        head = Text(t.description, style="bold")
        room = options.max_width - head.cell_len - len(text) - 2
        if room < self.MIN_BAR:  # no room for a bar: the words only, on two lines if need be
            fits = head.cell_len + 1 + len(text) <= options.max_width
            yield Text.assemble(head, " " if fits else "\n", text, overflow="fold")
            return
        grid = Table.grid(padding=(0, 1))
        grid.add_row(head, ProgressBar(total=t.total, completed=t.completed, width=room),
                     Text(text, no_wrap=True))
        yield grid


class _Notebook:
    """tqdm in a notebook: its widget with ``ipywidgets``, else its one text line."""

    def __init__(self, total: int, description: str, unit: str):
        try:
            import ipywidgets  # noqa: F401  (only whether Jupyter widgets are installed)
            from tqdm.notebook import tqdm
        except ImportError:
            from tqdm.std import tqdm
        self.bar = tqdm(total=total, desc=description, unit=f" {unit}" if unit else "it",
                        file=sys.stderr, leave=True)

    def step(self, label: str = "", advance: int = 1) -> None:
        self.bar.set_postfix_str(label, refresh=False)
        self.bar.update(advance)

    def close(self, failed: bool) -> None:
        self.bar.close()
