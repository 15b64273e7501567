"""One progress bar for every long verb: description, bar, done/total, rate, elapsed and ETA.

Bars go to stderr (rich's default console there), so a verb's printed results stay clean when
piped; `disable=True` (tests, nested work) shows nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def out_console():
    """The console a verb prints its results on: the terminal's width in a terminal; piped or
    redirected, wide enough that no table is cut or wrapped at rich's default of 80 columns."""
    import sys

    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    return Console(width=1_000, soft_wrap=True)


def num(value, spec: str = ".3f") -> str:
    """A number as a table cell: "–" for a missing or undefined (NaN) value, as the report writes it."""
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def progress_bar(*, disable: bool = False, unit: str = "it"):
    """A rich Progress with rate and ETA; add tasks with `bar.add_task(description, total=N)`."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    class Rate(TextColumn):
        def __init__(self):
            super().__init__("")

        def render(self, task):
            from rich.text import Text

            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:,.1f} {unit}/s", style="progress.data.speed")

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                    Rate(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=disable)


def track(items: Iterable[T], description: str, *, total: int | None = None, disable: bool = False,
          unit: str = "it") -> Iterator[T]:
    """Iterate `items` under a bar (total: len(items) when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar(disable=disable, unit=unit) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
