"""Training data streamed from the store: each batch's payloads are read when the batch is due.

Recipe for batch i: the plan names its samples (`data.BatchPlan`), `batches.pick`
makes their seeded choices and so names the store items it needs,
`Store.locate` gives each item's (shard, offset, length, xxh3), the bytes are
read from the shard file (a local store's own file, or a remote store's shard
in the local `ShardCache`), checked against their xxh3, decoded with
safetensors and assembled by `batches.assemble`: the same function of
(seed, i) the in-memory path computed, so the tensors are equal.

`Feed` runs this in a `torch.utils.data.DataLoader` (worker processes, a
bounded prefetch, pinned memory on CUDA; workers hand over the stored fp16,
the training process makes it fp32) over the batch indices this process
takes, in order; for a remote store a thread fetches the shards of the next
batches ahead, in plan order, within the cache's byte limit. Memory holds the
table, the plan and a few batches, never the dataset.

Damage (docs/decisions.md 31): a worker that finds an item failing its
checksum, truncated, or in a vanished shard hands the batch back to the main
process, which reads the item through `Store.read` (every copy is checked, bad
ones are marked in the store). An intact copy is used; with none, the run
stops with `CacheDamaged` naming the item, and the pipeline runner recomputes
it (`sdxlpipe run encode`) and resumes training from the last checkpoint.
"""

from __future__ import annotations

import os
import threading
from collections import Counter, deque

import pyarrow as pa
import torch
import xxhash

from sdxlpipe.cache_format import CacheDamaged
from sdxlpipe.cache_format.shard_cache import ShardCache, default_directory
from sdxlpipe.training.batches import as_float, assemble, decode_latent, decode_text, pick

LATENTS, TEXTS = "vae_encode", "text_encode"


def shard_cache(store, p) -> ShardCache | None:
    """The local shard cache a store behind a URL is read through; None for a local path."""
    if "://" not in store.url:
        return None
    directory = p.shard_cache_dir or default_directory()
    return ShardCache(store.url, directory, int(p.shard_cache_gb * (1 << 30)))


class BatchSource:
    """Reads batch i of the run from the store. Fork-safe: loader workers use a copy."""

    def __init__(self, table: pa.Table, store, p, plan, cache: ShardCache | None):
        self.table, self.store, self.p, self.plan, self.cache = table, store, p, plan, cache
        self.stages = (LATENTS,) if p.train_text_encoder else (LATENTS, TEXTS)
        absent = {stage: store.missing(stage, keys) for stage, keys in _run_keys(table, self.stages).items()}
        if any(absent.values()):
            # Known before any step: the runner recomputes them and runs the train stage again.
            raise CacheDamaged({s: k for s, k in absent.items() if k},
                               f"{sum(map(len, absent.values()))} cached item(s) the run needs are missing from "
                               f"{store.url} or were found damaged")

    def _wanted(self, index: int, fixed: bool):
        epoch, members = self.plan.batch_at(index)
        rows = self.table.take(members).to_pylist()
        picks = pick(rows, members, self.p, epoch, index, fixed)
        wanted = {LATENTS: list(dict.fromkeys(c["latent_key"] for c in picks))}
        if TEXTS in self.stages:
            wanted[TEXTS] = list(dict.fromkeys(c["text_key"] for c in picks))
        return epoch, members, rows, wanted

    def shards(self, index: int) -> list[tuple[str, str]]:
        """(stage, shard id) of every item batch i reads, for fetching ahead."""
        _, _, _, wanted = self._wanted(index, False)
        return list(dict.fromkeys((stage, loc.shard_id) for stage, keys in wanted.items()
                                  for loc in self.store.locate(stage, keys) if loc is not None))

    def read(self, index: int, fixed: bool = False, known: dict | None = None) -> dict:
        """Batch i's tensors, or {"index", "damaged": [(stage, key, shard_id, why)]} when items are unusable.

        `known`: payloads already read and checked elsewhere, by (stage, key).
        """
        epoch, members, rows, wanted = self._wanted(index, fixed)
        payloads, damaged = dict(known or {}), []
        for stage, keys in wanted.items():
            todo = [k for k in keys if (stage, k) not in payloads]
            found, bad = self._read_items(stage, todo)
            payloads.update(((stage, k), v) for k, v in found.items())
            damaged += bad
        if damaged:
            return {"index": index, "damaged": damaged}
        latents = {k: decode_latent(payloads[(LATENTS, k)]) for k in wanted[LATENTS]}
        texts = {k: decode_text(payloads[(TEXTS, k)]) for k in wanted.get(TEXTS, ())}
        batch = assemble(rows, members, latents, texts, self.p, epoch, index, fixed, stored_dtype=True)
        return {**batch, "index": index}

    def _read_items(self, stage: str, keys: list[str]) -> tuple[dict, list]:
        """Checked payload bytes by key, shard by shard in offset order; and what could not be read."""
        by_shard: dict[str, list] = {}
        damaged = []
        for key, loc in zip(keys, self.store.locate(stage, keys)):
            if loc is None:
                damaged.append((stage, key, None, "not in the store"))
            else:
                by_shard.setdefault(loc.shard_id, []).append(loc)
        found = {}
        for shard_id, locs in by_shard.items():
            try:
                fd = self._open(stage, shard_id)
            except FileNotFoundError:
                damaged += [(stage, loc.item_key, shard_id, "shard file missing") for loc in locs]
                continue
            if fd is None:  # a remote shard that does not hash to its name: read its items one by one
                damaged += [(stage, loc.item_key, shard_id, "shard does not match its hash") for loc in locs]
                continue
            try:
                for loc in sorted(locs, key=lambda l: l.offset):
                    data = os.pread(fd, loc.length, loc.offset)
                    if len(data) != loc.length:
                        damaged.append((stage, loc.item_key, shard_id, f"truncated: {len(data)} of {loc.length} bytes"))
                    elif xxhash.xxh3_128_hexdigest(data) != loc.xxh3:
                        damaged.append((stage, loc.item_key, shard_id, "checksum mismatch"))
                    else:
                        found[loc.item_key] = data
            finally:
                os.close(fd)
        return found, damaged

    def _open(self, stage: str, shard_id: str) -> int | None:
        if self.cache is None:
            return os.open(os.path.join(self.store.root, "shards", stage, f"{shard_id}.tar"), os.O_RDONLY)
        for _ in range(2):
            path = self.cache.get(stage, shard_id)
            if path is None:
                return None
            try:
                return os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # evicted between fetch and open by another process: fetch again
        raise FileNotFoundError(shard_id)

    def recover(self, result: dict, fixed: bool = False) -> dict:
        """The batch, after reading its unusable items through the store; CacheDamaged if any has no intact copy."""
        known: dict = {}
        while "damaged" in result:
            lost: dict[str, list] = {}
            for stage, key, shard_id, why in result["damaged"]:
                if self.cache is not None and shard_id and why != "shard file missing":
                    self.cache.discard(shard_id)  # the local copy may be what is bad
                data = self.store.read(stage, key)  # checks every copy, marks the bad ones
                if data is None:
                    lost.setdefault(stage, []).append((key, shard_id, why))
                else:
                    known[(stage, key)] = data
            if lost:
                raise _damaged(self.store.url, lost)
            result = self.read(result["index"], fixed, known)
        return as_float(result)

    def batch(self, index: int, fixed: bool = False) -> dict:
        """Batch i, read in this process (the fixed evaluation batches)."""
        return self.recover(self.read(index, fixed), fixed)


def _run_keys(table: pa.Table, stages) -> dict[str, list[str]]:
    """Every store item the run may read: latents and flipped latents; texts, their variants, the empty one."""
    columns = {LATENTS: ("latent_key", "latent_flip_key"),
               TEXTS: ("text_key", "text_variant_keys", "empty_text_key")}
    keys: dict[str, dict] = {}
    for stage in stages:
        found = keys.setdefault(stage, {})
        for column in columns[stage]:
            if column in table.column_names:
                for value in table.column(column).to_pylist():
                    found.update(dict.fromkeys(v for v in (value if isinstance(value, list) else [value]) if v))
    return {stage: list(found) for stage, found in keys.items()}


def _damaged(url: str, lost: dict[str, list]) -> CacheDamaged:
    first_stage, ((key, shard_id, why), *_) = next(iter(lost.items()))
    count = sum(map(len, lost.values()))
    what = (f"{count} cached item(s) needed by training have no intact copy in {url}: "
            f"{first_stage} item {key}" + (f" in shard {shard_id}" if shard_id else "") + f" ({why})"
            + (f" and {count - 1} more" if count > 1 else "") + "; marked bad in the store")
    error = CacheDamaged({stage: [k for k, _, _ in items] for stage, items in lost.items()}, what)
    error.hint = ("`sdxlpipe run encode` recomputes them, and `sdxlpipe run train` then resumes from the last "
                  "checkpoint (`sdxlpipe run train` alone does both)")
    return error


class _Indices(torch.utils.data.Dataset):
    """Position k -> batch indices[k], read by a loader worker."""

    def __init__(self, source: BatchSource, indices: range):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        return self.source.read(self.indices[k])


class Feed:
    """This process's batches, in order, from loader workers; `take(i)` returns batch i."""

    def __init__(self, source: BatchSource, indices: range, workers: int, pin_memory: bool, prefetch: int):
        self.source, self.indices = source, indices
        loader = torch.utils.data.DataLoader(
            _Indices(source, indices), batch_size=None, shuffle=False, num_workers=workers,
            prefetch_factor=prefetch if workers else None, pin_memory=pin_memory,
            # Its own generator: creating the iterator must not draw from the global RNG the loop seeds.
            generator=torch.Generator().manual_seed(0))
        self._it = iter(loader)  # forks the workers, before any thread of ours starts
        self._consumed = 0
        self._moved = threading.Condition()
        self._stop = False
        self._thread = None
        if source.cache is not None and len(indices):
            self._thread = threading.Thread(target=self._fetch_ahead, name="sdxlpipe-shard-prefetch", daemon=True)
            self._thread.start()

    def take(self, index: int) -> dict:
        result = next(self._it)
        if result["index"] != index:
            raise RuntimeError(f"the loader delivered batch {result['index']} where batch {index} was due")
        with self._moved:
            self._consumed += 1
            self._moved.notify_all()
        return self.source.recover(result)

    def _fetch_ahead(self) -> None:
        """Fetch the shards of the coming batches in plan order, holding at most the cache's limit ahead."""
        cache, window = self.source.cache, deque()  # window: (position, shard ids) of fetched batches not yet taken
        held, refs = {}, Counter()  # shard id -> bytes, and how many window batches use it
        for position, index in enumerate(self.indices):
            with self._moved:
                while True:
                    while window and window[0][0] < self._consumed:
                        for shard_id in window.popleft()[1]:
                            refs[shard_id] -= 1
                            if not refs[shard_id]:
                                del held[shard_id], refs[shard_id]
                    if self._stop:
                        return
                    if sum(held.values()) < cache.limit_bytes or not window:
                        break
                    self._moved.wait(timeout=1.0)
            ids = []
            try:
                for stage, shard_id in self.source.shards(index):
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
        self._it = None  # shuts the loader workers down


def open_source(table: pa.Table, store, p, plan) -> BatchSource:
    return BatchSource(table, store, p, plan, shard_cache(store, p))


def open_feed(source: BatchSource, p, *, start_step: int, max_steps: int, world: int, rank: int, device) -> Feed:
    """This process's feed of batches s*N*A + a*N + r (decisions.md 12) for steps start_step..max_steps-1."""
    per_step = p.gradient_accumulation_steps * world
    indices = range(start_step * per_step + rank, max_steps * per_step, world)
    return Feed(source, indices, p.loader_workers, pin_memory=torch.device(device).type == "cuda",
                prefetch=p.loader_prefetch)
