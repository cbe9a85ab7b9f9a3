"""Progress bars and log lines, all on stderr (results go to stdout).

One `Reporter` per run, passed in the context; stages call `track()` for a
bar with item counts, rate and ETA, and `log` for messages.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
    TimeElapsedColumn, TimeRemainingColumn,
)

log = logging.getLogger("sdxlpipe")


def setup_logging(console: Console, debug: bool = False) -> None:
    """Called once by the CLI: sdxlpipe's loggers print through rich on stderr."""
    root = logging.getLogger("sdxlpipe")
    root.handlers[:] = [RichHandler(console=console, show_path=debug, show_time=False, markup=False)]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False


class Reporter:
    def __init__(self, console: Console | None = None, enabled: bool = True) -> None:
        self.console = console or Console(stderr=True)
        # Bars only on a terminal: a CI log or a pipe gets the log lines alone.
        self.enabled = enabled and self.console.is_terminal

    @contextmanager
    def track(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        """Yield `advance(n=1, **fields)`; a bar when on a terminal, nothing otherwise."""
        if not self.enabled or total <= 0:
            yield lambda n=1, **fields: None
            return
        columns = [
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TaskProgressColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(),
        ]
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task(description, total=total, info="")

            def advance(n: int = 1, **fields) -> None:
                info = "  ".join(f"{k} {v}" for k, v in fields.items())
                bar.update(task, advance=n, info=info)

            yield advance
