"""One progress bar for every long verb: description, bar, done/total, rate, elapsed and ETA.

Bars go to stderr (rich's default console there), so a verb's printed results stay clean when
piped; `disable=True` (tests, nested work) shows nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


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
