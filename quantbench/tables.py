"""Result tables that fit the console they are printed on, without cutting a number.

rich shrinks a table that is wider than the console by cutting cells (``met…``, ``26.…``,
``+39…``). A :class:`FitTable` chooses its layout at the width it is drawn at instead:

1. the whole table, when it fits (or when ``wide``: then at its own width, wider than the
   console — print it with ``crop=False``);
2. the whole table with its headers wrapped onto two lines (``KLD`` over ``p99``);
3. the columns split into panels, one under the other, each repeating the key columns that
   name the rows — every value is still shown, as pandas prints a frame wider than the console;
4. where that takes more than two panels (wide key columns) or does not fit at all (or for a
   long listing, ``panels=False``, that should not be printed twice), one block per row: its
   key, then ``header value`` pairs, as many to a line as fit.

The width is the console's: the terminal's, else ``COLUMNS``, else 80 (rich's rule, so piped
output is laid out for 80 columns unless ``COLUMNS`` says otherwise). Cells are rich markup;
a cell never wraps, so a number is either shown whole or not laid out on that line at all.
Rendering only: the numbers come formatted from the caller and are never changed here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

NO_LIMIT = 10_000
MAX_PANELS = 2


@dataclass(frozen=True)
class Col:
    header: str
    justify: str = "right"
    key: bool = False  # names the row: repeated in every panel


@dataclass
class FitTable:
    columns: Sequence[Col]
    rows: list[Sequence[str]] = field(default_factory=list)
    title: str | None = None
    caption: str | None = None
    wide: bool = False
    hint: str = "a wider console shows one table"  # how to get the whole table at once
    panels: bool = True  # False: a long listing goes to blocks rather than repeat its rows

    def add_row(self, *cells: str) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(cells)

    def __rich_console__(self, console, options):
        width = options.max_width
        whole = self._table(range(len(self.columns)))
        natural = _measure(console, options, whole)
        if self.wide or natural <= width:
            yield whole if natural <= width else _at_width(whole, natural)
            return
        tight = self._tight_widths()
        whole = self._table(range(len(self.columns)), tight)
        if _measure(console, options, whole) <= width:
            yield whole
            return
        panels = self._panels(console, options, tight, width) if self.panels else None
        if panels is None:
            yield from self._stacked(width)
            return
        for index, panel in enumerate(panels):
            if index:
                yield ""
            yield panel

    def _table(self, indices: Iterable[int], widths: Sequence[int] | None = None,
               title: bool = True, caption: str | None = None):
        from rich.table import Table

        indices = list(indices)
        table = Table(title=self.title if title else None,
                      caption=caption if caption is not None else self.caption)
        for i in indices:
            c = self.columns[i]
            table.add_column(c.header, justify=c.justify,
                             width=None if widths is None else widths[i])
        for row in self.rows:
            table.add_row(*(_cell(row[i]) for i in indices))
        return table

    def _tight_widths(self) -> list[int]:
        """Each column as narrow as its widest cell (cells do not wrap) or its longest header
        word (headers do)."""
        return [max([_cell_len(row[i]) for row in self.rows] +
                    [_cell_len(w) for w in c.header.split()] + [1])
                for i, c in enumerate(self.columns)]

    def _panels(self, console, options, tight: list[int], width: int):
        """The columns in order, as many to a panel as fit beside the key columns; None when
        the key columns and one more do not fit, or when it takes more than ``MAX_PANELS``."""
        keys = [i for i, c in enumerate(self.columns) if c.key]
        rest = [i for i, c in enumerate(self.columns) if not c.key]
        groups: list[list[int]] = []
        for i in rest:
            if groups and _measure(console, options,
                                   self._table(keys + groups[-1] + [i], tight)) <= width:
                groups[-1].append(i)
            elif _measure(console, options, self._table(keys + [i], tight)) <= width:
                groups.append([i])
            else:
                return None
        if len(groups) > MAX_PANELS:  # wide key columns: blocks say it in fewer lines
            return None
        note = f"split to fit {width} columns; {self.hint}"
        caption = f"{self.caption}\n{note}" if self.caption else note
        panels = []
        for n, group in enumerate(groups):
            kwargs = {"title": n == 0, "caption": caption if n == len(groups) - 1 else ""}
            natural = self._table(keys + group, **kwargs)  # headers on one line if they fit
            fits = _measure(console, options, natural) <= width
            panels.append(natural if fits else self._table(keys + group, tight, **kwargs))
        return panels

    def _stacked(self, width: int):
        """One block per row: the key cells, then ``header value`` pairs (empty cells left
        out), on the key's line while they fit, then on indented lines."""
        from rich.text import Text

        keys = [i for i, c in enumerate(self.columns) if c.key]
        if self.title:
            yield Text.from_markup(f"[italic]{self.title}[/]", overflow="fold")
        for row in self.rows:
            line = Text.from_markup(row[keys[0]] if keys else "—", style="bold")
            for i in keys[1:]:  # the other key cells named, e.g. ``gptq  bits 4  group 64``
                line.append_text(Text.assemble("  ", _pair(self.columns[i].header, row[i])))
            fresh = False  # a continuation line with nothing on it yet
            for i, c in enumerate(self.columns):
                if c.key or not Text.from_markup(row[i]).plain.strip():
                    continue
                pair = _pair(c.header, row[i])
                if not fresh and line.cell_len + 3 + pair.cell_len > width:
                    line.overflow = "fold"
                    yield line
                    line, fresh = Text("  "), True
                line.append_text(Text("" if fresh else "   "))
                line.append_text(pair)
                fresh = False
            line.overflow = "fold"
            yield line
        if self.caption:
            yield Text.from_markup(self.caption, style="dim", overflow="fold")
        yield Text(f"one block per row to fit {width} columns; {self.hint}", style="dim",
                   overflow="fold")


def _cell(markup: str):
    """A cell that never wraps (a header still does, at its spaces)."""
    from rich.text import Text

    text = Text.from_markup(markup, overflow="fold")
    text.no_wrap = True
    return text


def _pair(header: str, markup: str):
    from rich.text import Text

    return Text.assemble(Text(header, style="dim"), " ", Text.from_markup(markup))


def _cell_len(markup: str) -> int:
    from rich.text import Text

    return Text.from_markup(markup).cell_len


def _measure(console, options, table) -> int:
    from rich.measure import Measurement

    return Measurement.get(console, options.update_width(NO_LIMIT), table).maximum


class _at_width:
    """A renderable drawn at ``width`` whatever the console's (``--wide``)."""

    def __init__(self, renderable, width: int):
        self.renderable, self.width = renderable, width

    def __rich_console__(self, console, options):
        yield from console.render(self.renderable, options.update_width(self.width))
