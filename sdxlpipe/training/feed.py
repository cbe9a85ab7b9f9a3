"""The feed: this process's batches, in order, read ahead by reader threads.

`Feed.take(i)` returns batch i of the run; `workers` threads of the training
process read at most workers x prefetch batches ahead through the
`BatchSource` (stream.py), planning and locating 16 batches at a time. Batches
are read into byte buffers from a ring: `Feed.release(i)` hands batch i's back
once the loop has copied what it needs, so a run reads into the same few
buffers batch after batch instead of faulting in (or pinning) fresh memory
for each (decision 65). For a remote store a thread fetches the shards of the
coming batches into the shard cache, in plan order, within its byte limit, and
the items of the batches read ahead that are read by range (`BatchSource.fetch`)
are fetched by the source's I/O threads as each batch is handed to a reader.
`open_feed` picks this process's batches (decisions.md 12).
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from queue import Empty, Full, Queue
from typing import TYPE_CHECKING

from sdxlpipe.training.slots import Buffers

if TYPE_CHECKING:
    from sdxlpipe.training.stream import BatchSource

# Batches planned and located together (`BatchSource.prepare`): 16 cut the per-batch lookup cost ~4x
# and hold a few KB.
PREPARE_BATCHES = 16


class Ring:
    """The buffers of released batches (`slots.Buffers`), for the next reads to reuse.

    Never blocks: with none free a read gets new buffers (a caller that never releases reads as before),
    and buffers beyond `capacity` are dropped.
    """

    def __init__(self, capacity: int):
        self._free: Queue = Queue(maxsize=capacity)

    def get(self) -> Buffers:
        try:
            return self._free.get_nowait()
        except Empty:
            return Buffers()

    def put(self, buffers: Buffers) -> None:
        try:
            self._free.put_nowait(buffers)
        except Full:
            pass


class Feed:
    """This process's batches, in order, read ahead by `workers` reader threads; `take(i)` returns batch i,
    `release(i)` gives its buffers back once nothing refers to its tensors any more.

    At most workers x prefetch batches are read ahead. With 0 workers `take` reads the batch itself.
    """

    def __init__(self, source: BatchSource, indices: range, workers: int, prefetch: int):
        self.source, self.indices = source, indices
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="sdxlpipe-reader") if workers else None
        self._limit = workers * prefetch
        # Batches alive at once: those read ahead, one more submitted while the loop holds one, that one.
        self._ring = Ring(self._limit + 2)
        # Batches lent and not yet released the feed keeps buffers of: past these the oldest are forgotten
        # (never reused; garbage once the caller drops them), so a caller that never releases holds only what it
        # keeps. The loop holds one at a time; without this bound each batch taken stayed alive (+2.3 MiB per
        # SDXL batch of 4: bench/README, train_from_store.py).
        self._lend = self._limit + 2
        self._lent: dict[int, Buffers] = {}  # batch index -> the buffers under the batch the loop holds
        self._copying: deque = deque()  # (event, buffers) released while a GPU copy from them may still run
        self._ahead: deque[Future] = deque()
        self._submitted = 0  # positions handed to the readers so far
        self._consumed = 0
        self._moved = threading.Condition()
        self._stop = False
        self._thread = None
        if source.caches and len(indices):
            self._thread = threading.Thread(target=self._fetch_ahead, name="sdxlpipe-shard-prefetch", daemon=True)
            self._thread.start()
        self._read_ahead()

    def _prepare(self, position: int) -> None:
        if position % PREPARE_BATCHES == 0:
            self.source.prepare(self.indices[position:position + PREPARE_BATCHES])

    def _read_ahead(self) -> None:
        while self._pool is not None and self._submitted < len(self.indices) and len(self._ahead) < self._limit:
            self._prepare(self._submitted)
            self.source.fetch(self.indices[self._submitted])
            self._ahead.append(self._pool.submit(self._read, self.indices[self._submitted]))
            self._submitted += 1

    def _read(self, index: int) -> dict:
        return self.source.read(index, buffers=self._ring.get())

    def take(self, index: int) -> dict:
        self._reclaim()
        if self._pool is None:
            self._prepare(self._consumed)
            result = self._read(self.indices[self._consumed])
        else:
            future = self._ahead.popleft()
            self._read_ahead()  # keep the readers busy while this one is waited for
            result = future.result()
        if result["index"] != index:
            raise RuntimeError(f"the loader delivered batch {result['index']} where batch {index} was due")
        with self._moved:
            self._consumed += 1
            self._moved.notify_all()
        batch = self.source.recover(result)
        self._lent[index] = batch.pop("buffers")
        while len(self._lent) > self._lend:
            del self._lent[next(iter(self._lent))]
        return batch

    def release(self, index: int, after=None) -> None:
        """Batch `index`'s buffers back to the ring: its tensors will be overwritten by a coming batch, so the
        caller must hold no reference to them (the loop releases after `batches.to_device` copied them).
        after: a CUDA event recorded after asynchronous copies from them; the ring gets them once it is done."""
        buffers = self._lent.pop(index, None)
        if buffers is not None and after is not None:
            self._copying.append((after, buffers))
        elif buffers is not None:
            self._ring.put(buffers)
        self._reclaim()

    def _reclaim(self) -> None:
        """The buffers whose copies are done back to the ring (events on one stream complete in order)."""
        while self._copying and self._copying[0][0].query():
            self._ring.put(self._copying.popleft()[1])

    def _fetch_ahead(self) -> None:
        """Fetch the shards of the coming batches in plan order, holding at most the cache's limit ahead."""
        # window: (position, shard ids) of fetched batches not yet taken. Remote stores share the limit.
        limit, window = min(c.limit_bytes for c in self.source.caches), deque()
        held, refs = {}, Counter()  # shard id -> bytes, and how many window batches use it
        for position, index in enumerate(self.indices):
            if position < self._consumed:
                continue  # already read (by ranges): fetching its shards now would only fetch them twice
            with self._moved:
                while True:
                    while window and window[0][0] < self._consumed:
                        for shard_id in window.popleft()[1]:
                            refs[shard_id] -= 1
                            if not refs[shard_id]:
                                del held[shard_id], refs[shard_id]
                    if self._stop:
                        return
                    if sum(held.values()) < limit or not window:
                        break
                    self._moved.wait(timeout=1.0)
            ids = []
            try:
                for stage, shard_id in self.source.shards(index):
                    cache = self.source.cache_of(stage, shard_id)
                    if cache is None:
                        continue  # a local store's shard: read in place
                    path = cache.get(stage, shard_id, keep=frozenset(held))
                    if path is not None:
                        held[shard_id] = path.stat().st_size
                        refs[shard_id] += 1
                        ids.append(shard_id)
            except Exception:  # the reader meets the same error when the batch is due, and reports it there
                return
            window.append((position, ids))

    def __enter__(self) -> "Feed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._moved:
            self._stop = True
            self._moved.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)  # a reader finishes the batch it is on
        self.source.close()
        for cache in self.source.caches:
            if cache.directory.is_dir():
                # The window fetched ahead may pass the limit by a batch's shards; nothing is held now.
                cache.evict()



def open_feed(source: BatchSource, p, *, start_step: int, max_steps: int, world: int, rank: int, device) -> Feed:
    """This process's feed of batches s*N*A + a*N + r (decisions.md 12) for steps start_step..max_steps-1."""
    per_step = p.gradient_accumulation_steps * world
    indices = range(start_step * per_step + rank, max_steps * per_step, world)
    return Feed(source, indices, p.loader_workers, prefetch=p.loader_prefetch)
