"""Progress with stderr in a file: plain lines at a steady cadence, with counts, rate and ETA."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from sdxlpipe.pipeline.progress import Reporter, setup_logging


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def log_file():
    """A non-terminal stderr (a file, as with `2>run.log`), wired the way the CLI wires it."""
    root = logging.getLogger("sdxlpipe")
    saved = root.handlers[:], root.level, root.propagate
    console = Console(file=io.StringIO(), force_terminal=False)
    yield console
    root.handlers[:], root.level = saved[0], saved[1]
    root.propagate = saved[2]


def lines(console) -> list[str]:
    return console.file.getvalue().splitlines()


def test_a_quick_stage_logs_a_line_every_5_percent_with_counts(log_file):
    setup_logging(log_file)
    clock = Clock()
    with Reporter(log_file, clock=clock).track("vae_encode", 200) as advance:
        for _ in range(200):
            clock.now += 0.01
            advance(1)
    out = lines(log_file)
    assert "vae_encode: 200 items to do" in out[0]
    progress = [line for line in out[1:] if "vae_encode " in line]
    assert len(progress) == 20  # 10, 20, ... 200: every 5%
    assert "vae_encode 10/200 items (5%)" in progress[0] and "items/s" in progress[0] and "ETA" in progress[0]
    assert "vae_encode 200/200 items (100%)" in progress[-1]
    assert all(" INFO " in line for line in out)  # plain timestamped lines, no rich markup


def test_a_slow_stage_logs_every_10_seconds_and_train_shows_step_loss_lr_and_s_per_step(log_file):
    setup_logging(log_file)
    clock = Clock()
    with Reporter(log_file, clock=clock).track("train", 1000, unit="step") as advance:
        for step in range(30):
            clock.now += 2.5  # a CPU step: 30 steps are 3% of the run, 75 s
            advance(1, loss=f"{1 / (step + 1):.4f}", lr="1.00e-04", it_s="0.40")
    progress = [line for line in lines(log_file)[1:] if "train step" in line]
    assert [p.split("train step ")[1].split(" ")[0] for p in progress] == [
        "4/1000", "8/1000", "12/1000", "16/1000", "20/1000", "24/1000", "28/1000", "30/1000"]
    assert "2.50 s/step" in progress[0] and "loss 0.2500" in progress[0] and "lr 1.00e-04" in progress[0]
    assert "it_s" not in progress[0]


def test_quiet_prints_no_progress_but_warnings_still_show(log_file):
    setup_logging(log_file, quiet=True)
    with Reporter(log_file).track("vae_encode", 10) as advance:
        advance(10)
    logging.getLogger("sdxlpipe.ingest").warning("skipped x.png: empty file")
    assert lines(log_file) == [lines(log_file)[0]] and "skipped x.png" in lines(log_file)[0]


def test_work_of_unknown_size_logs_counts_and_rate_every_10_seconds_and_nothing_when_quick(log_file):
    setup_logging(log_file)
    clock = Clock()
    reporter = Reporter(log_file, clock=clock)
    with reporter.track("ingest", None) as advance:
        for _ in range(25):
            clock.now += 1.0
            advance(64)
    out = lines(log_file)
    assert [line.split(" INFO ")[1].split("  ")[0] for line in out] == [
        "ingest 640 items", "ingest 1280 items", "ingest 1600 items"]
    assert "64.00 items/s" in out[0] and "ETA" not in out[0] and "%" not in out[0]
    with reporter.track("ingest", None) as advance:
        advance(64)
    assert len(lines(log_file)) == 3  # a quick ingest adds no line


def test_work_done_before_the_clock_moves_logs_without_a_rate(log_file):
    setup_logging(log_file)
    with Reporter(log_file, clock=Clock()).track("text_encode", 40) as advance:
        advance(10)
        advance(30)
    assert "text_encode 10/40 items (25%)" in lines(log_file)[1] and "ETA" not in lines(log_file)[1]
