"""Rich progress bars with an ETA for long loops (library code stays silent when disabled)."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


def make_progress(console: Console | None = None) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[step]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        transient=False,
    )


@contextlib.contextmanager
def block_progress(total: int, description: str, enabled: bool = True
                   ) -> Iterator[Callable[[str], None]]:
    """Yield ``step(label)``; each call advances the bar by one block."""
    if not enabled:
        yield lambda label: None
        return
    with make_progress() as progress:
        task = progress.add_task(description, total=total, step="")
        try:
            yield lambda label: progress.update(task, advance=1, step=label)
        except BaseException:
            progress.live.transient = True  # a failed run ends on its error line alone
            raise
