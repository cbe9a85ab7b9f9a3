"""The local engine: the model in this process, images decoded in worker processes.

Decode and resize run in a pool of `workers` processes that stay `PREFETCH`
batches ahead of the model, so the encoder does not wait for the CPU (see
bench/encode.py). workers = 0 decodes in this process (tests, debugging).
Workers are spawned, not forked: the parent holds torch's thread pools.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable, Iterator, Sequence

from sdxlpipe.engines import Result

# Batches decoded ahead of the encoder: enough to ride out one slow image, and
# memory stays bounded by (PREFETCH + 1) batches whatever the dataset size.
PREFETCH = 2


class LocalEngine:
    name = "local"

    def __init__(self, workers: int):
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor | None:
        if self.workers > 0 and self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def run(self, jobs: Sequence[dict], prepare: Callable[[dict], Any] | None,
            make_worker: Callable[[], Callable[[list[dict], list[Any]], list[Result]]],
            batch_size: int) -> Iterator[list[Result]]:
        worker = make_worker()  # cheap: the models themselves are loaded once per run
        batches = [list(jobs[i:i + batch_size]) for i in range(0, len(jobs), batch_size)]
        pool = self._executor() if prepare is not None else None
        if pool is None:
            for batch in batches:
                prepared = [prepare(j) for j in batch] if prepare is not None else [None] * len(batch)
                yield worker(batch, prepared)
            return
        pending: deque[tuple[list[dict], list[Future]]] = deque()
        todo = iter(batches)
        try:
            for batch in todo:
                pending.append((batch, [pool.submit(prepare, j) for j in batch]))
                if len(pending) > PREFETCH:
                    done_batch, futures = pending.popleft()
                    yield worker(done_batch, [f.result() for f in futures])
            while pending:
                done_batch, futures = pending.popleft()
                yield worker(done_batch, [f.result() for f in futures])
        finally:
            for _, futures in pending:
                for f in futures:
                    f.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
