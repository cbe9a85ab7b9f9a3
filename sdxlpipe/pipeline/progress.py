"""Progress bars and log lines, all on stderr (results go to stdout).

One `Reporter` per run, passed in the context; stages call `track()` for
progress with item counts, rate and ETA, and `log` for messages. On a
terminal that is a rich bar; anywhere else (a file, a pipe, nohup, SLURM, CI)
it is a plain log line every `LINE_SECONDS` or `LINE_FRACTION` of the work,
whichever comes first, plus one when the stage starts and one when it ends.
`--quiet` turns both off (warnings and errors still print); `--verbose`
adds debug messages.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
    TimeElapsedColumn, TimeRemainingColumn,
)

log = logging.getLogger("sdxlpipe")

# A log file gets a progress line at least this often: often enough to see a
# run is alive, rare enough that a day-long run leaves a readable log.
LINE_SECONDS = 10.0
# ... and at every 5% of the work, so short stages still show their counts.
LINE_FRACTION = 0.05


def setup_logging(console: Console, debug: bool = False, quiet: bool = False) -> None:
    """Called once by the CLI: sdxlpipe's loggers print on stderr.

    A terminal gets rich's handler; a file or pipe gets plain timestamped
    lines that grep and `tail -f` read, never wrapped at 80 columns.
    """
    root = logging.getLogger("sdxlpipe")
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=debug, show_time=False, markup=False)
    else:
        handler = logging.StreamHandler(console.file if console.file is not None else sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    root.propagate = False


class Reporter:
    def __init__(self, console: Console | None = None, enabled: bool = True, clock=time.monotonic) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.clock = clock  # seconds; a test gives its own to check the cadence
        # Bars only on a terminal: a log file or a pipe gets plain progress lines.
        self.bars = enabled and self.console.is_terminal

    @contextmanager
    def track(self, description: str, total: int | None, unit: str = "item") -> Iterator[Callable[..., None]]:
        """Yield `advance(n=1, **fields)`: a bar on a terminal, log lines elsewhere, nothing when disabled.

        `total=None`: not known in advance (ingest walking a folder); counts and rate, no ETA.
        `unit`: what one unit of work is called in a log line ("step": `train step 4/1000`).
        """
        if not self.enabled or (total is not None and total <= 0):
            yield lambda n=1, **fields: None
            return
        if not self.bars:
            with _log_lines(description, total, unit, self.clock) as advance:
                yield advance
            return
        columns = [
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TaskProgressColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(),
        ]
        # A bar of unknown length (ingest listing files) is gone when done: the summary says the rest.
        with Progress(*columns, console=self.console, transient=total is None) as bar:
            task = bar.add_task(description, total=total, info="")

            def advance(n: int = 1, **fields) -> None:
                info = "  ".join(f"{k} {v}" for k, v in fields.items())
                bar.update(task, advance=n, info=info)

            yield advance


@contextmanager
def _log_lines(description: str, total: int | None, unit: str = "item",
               clock=time.monotonic) -> Iterator[Callable[..., None]]:
    """Progress as `vae_encode 12/32 items (38%)  3.1 items/s  ETA 6s` lines on the sdxlpipe logger."""
    logger = logging.getLogger(f"sdxlpipe.{description}")
    began = clock()
    # Units between lines, whatever the time; with no total, only the clock sets the pace.
    every = max(1, math.ceil(total * LINE_FRACTION)) if total else math.inf
    state = {"done": 0, "at": began, "printed": 0, "fields": {}}
    if total:
        logger.info("%s: %d %ss to do", description, total, unit)

    def line() -> None:
        done, elapsed = state["done"], clock() - began
        rate = done / elapsed if elapsed > 0 else 0.0
        of = f"/{total}" if total else ""
        text = f"{description} {unit} {done}{of}" if unit != "item" else f"{description} {done}{of} items"
        text += f" ({100 * done / total:.0f}%)" if total else ""
        if done:
            # Slow work (a train step on a CPU) reads better as seconds per unit.
            text += f"  {rate:.2f} {unit}s/s" if rate >= 1 else f"  {1 / rate:.2f} s/{unit}" if rate else ""
            text += f"  elapsed {_duration(elapsed)}"
            if total and done < total and rate:
                text += f"  ETA {_duration((total - done) / rate)}"
        extra = {k: v for k, v in state["fields"].items() if k != "it_s"}  # the rate is already there
        if extra:
            text += "  " + "  ".join(f"{k} {v}" for k, v in extra.items())
        logger.info("%s", text)
        state["at"], state["printed"] = clock(), done

    def advance(n: int = 1, **fields) -> None:
        state["done"] += n
        state["fields"].update(fields)
        if n and (clock() - state["at"] >= LINE_SECONDS or state["done"] - state["printed"] >= every
                  or (total and state["done"] >= total)):
            line()

    yield advance
    if state["done"] != state["printed"] and (total or state["printed"]):  # a quick unknown-length task stays quiet
        line()  # where it stopped, if the last advance did not print


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
