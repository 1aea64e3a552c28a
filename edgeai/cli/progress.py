"""The CLI's progress bars: library functions take a `progress=` callback (done, total, what) and
draw nothing; the CLI hands them one that draws a rich bar on stderr."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(quiet: bool) -> Iterator[Callable[[int, int, str], None]]:
    """A `progress=` callback drawing one rich bar (bytes, speed, time left) on stderr; nothing when
    `quiet` or when stderr is not a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    console = Console(stderr=True)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), console=console, disable=quiet or not console.is_terminal, transient=False)
    tasks: dict[str, int] = {}

    def update(done: int, total: int, what: str) -> None:
        if what not in tasks:
            tasks[what] = bar.add_task(what, total=total)
        bar.update(tasks[what], completed=done, total=total)

    with bar:
        yield update
