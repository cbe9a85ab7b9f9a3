"""Training data streamed from the store: `BatchSource` reads batch i of a run when it is due.

Recipe for batch i: the plan names its samples (`data.BatchPlan`), `batches.pick`
makes their seeded choices and so names the store items it needs,
`Store.locate` gives each item's (shard, offset, length, xxh3) (for 16
batches at a time: one lookup has a fixed cost), and `slots.read_item` reads
each item's tensors straight into their slots of the batch, checked by xxh3.
The micro-conditioning comes from `batches.conditioning`.

Batches are delivered in the stored dtype (fp16: half the bytes to copy, to
pin and to send to a GPU); the loop makes them fp32 on its device
(`batches.to_device`: on a GPU after the copy, decision 78).
`feed.Feed` reads ahead in `loader_workers` threads of the training process:
preadv and the tensor copies release the GIL, and nothing crosses a process
boundary (worker processes handed a 4.5 MB batch over shared memory at ~16
batches/s on a 2-core VM; decision 39). A remote store's shards come through
the local `ShardCache`, and an item whose shard is not cached yet is read by
a range request, so the first batch never waits for whole shards. Items read
by range in the shard_blocks order (texts) are fetched ahead of their batch by
`REMOTE_READS` I/O threads (`fetch`, decision 81), not one round trip after
another in the reader threads. Memory
holds the table, the plan and a few batches, never the dataset.

Damage (docs/decisions.md 31): an item failing its checksum, truncated, or in
a vanished shard makes the reader hand the batch back marked damaged; `recover`
reads the item through `Store.read` (every copy is checked, bad ones are
marked in the store). An intact copy is used; with none, the run stops with
`CacheDamaged` naming the item, and the pipeline runner recomputes it
(`sdxlpipe run encode`) and resumes training from the last checkpoint. With
several processes, `agree_on_damage` makes every process stop with that error.
An item that passes its checksum but breaks the payload schema is not damage: the
run stops with `PayloadRefused` naming it, and nothing is recomputed (decision 76).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import torch

from sdxlpipe.cache_format import CacheDamaged, decode_tensors, payloads
from sdxlpipe.cache_format.shard_cache import ShardCache, default_directory
from sdxlpipe.pipeline.keys import keys_in_columns
from sdxlpipe.stages import store_fields
from sdxlpipe.training.batches import conditioning, pick
from sdxlpipe.training.slots import Buffers, FileShard, RemoteShard, Refused, Slots, read_item

# Remote items read by range (the shard_blocks order's texts, decisions 79 and 81) are fetched this many at
# a time, ahead of the reader threads, by I/O threads that only wait on the socket (no torch work, so the
# thread rule of decision 64 is unchanged). 16: every text of the feed's default read-ahead window
# (loader_workers x loader_prefetch = 4 batches of 4) in flight at once; measured with 20 ms answers, 8 gave
# 0.8x of 16's samples/s and 0 (no read-ahead) 0.23x (bench/README.md). Raise it with loader_prefetch for a store further away
# or larger batches; lower it for a server that limits connections per client. 0 reads each item in its
# reader thread, one request after another (the behaviour before decision 81).
REMOTE_READS = 16

# The table columns `batches.pick` and `batches.conditioning` read.
ROW_COLUMNS = ("latent_key", "latent_flip_key", "text_key", "text_variant_keys", "empty_text_key", "caption",
               "caption_variants", "is_reg", "width", "height", "resize_w", "crop_top", "crop_left",
               "bucket_w", "bucket_h")


def shard_cache(store, p) -> ShardCache | None:
    """The local shard cache a store behind a URL is read through; None for a local path."""
    if "://" not in store.url:
        return None
    directory = p.shard_cache_dir or default_directory()
    return ShardCache(store.url, directory, int(p.shard_cache_gb * (1 << 30)))


class BatchSource:
    """Reads batch i of the run from the store; safe to call from several reader threads at once.

    `store` is a Store, or `cache_format.layers.Layers` (published datasets over the config's store):
    each shard is read from the store it was located in (`home`), through that store's shard cache.
    """

    def __init__(self, table: pa.Table, store, p, plan, stages: dict, pin_memory: bool = False):
        """stages: the run's stages (`Config.stages`): which of them hold the items the table's key columns
        name, and in which store field (their STORE_COLUMNS and FIELD)."""
        self.store, self.p, self.plan, self.pin_memory = store, p, plan, pin_memory
        stores = getattr(store, "stores", [store])
        self._caches = {s.url: shard_cache(s, p) for s in stores}  # one per store behind a URL, None for a path
        self.caches = [c for c in self._caches.values() if c is not None]
        # Only the columns a batch reads: taking a batch's rows then costs what those need.
        self.table = table.select([c for c in ROW_COLUMNS if c in table.column_names])
        where = store_fields(stages)  # table column -> (stage, store field)
        # The stages `pick`'s latent and text keys are items of; a field each lets `Store.locate` answer a
        # batch's keys with one vectorised lookup.
        self.latents, self.texts = where["latent_key"][0], where["text_key"][0]
        self.fields = {stage: field for stage, field in where.values()}
        self.stages = (self.latents,) if p.train_text_encoder else (self.latents, self.texts)
        absent = {stage: store.missing(stage, keys_in_columns(table, [c for c, (s, _) in where.items() if s == stage]))
                  for stage in self.stages}
        if any(absent.values()):
            # Known before any step: the runner recomputes them and runs the train stage again.
            raise CacheDamaged({s: k for s, k in absent.items() if k},
                               f"{sum(map(len, absent.values()))} cached item(s) the run needs are missing from "
                               f"{store.url} or were found damaged")
        # The store's index is shared by the reader threads; `recover` marks bad copies in it.
        self._store_lock = threading.Lock()
        self._plan_lock = threading.Lock()
        self._prepared: dict[int, tuple] = {}  # batch index -> (rows, picks, fills, locations), see `prepare`
        # The last safetensors header read per stage (and its parse): the next item is read in one preadv on it.
        self._headers: dict[str, tuple] = {}
        # Each local shard's path, checked once (Store.shard_path checks the id; a batch opens ~2 shards).
        self._paths: dict[tuple[str, str], str] = {}
        # Batch index -> {(stage, shard id): [(offset, length, future of the bytes)]}: the remote items `fetch`
        # started for the batches read ahead; `read` takes them. Bounded by the feed's read-ahead window.
        self._fetching: dict[int, dict] = {}
        self._io = (ThreadPoolExecutor(REMOTE_READS, thread_name_prefix="sdxlpipe-remote-read")
                    if self.caches and REMOTE_READS and plan.layout is not None else None)

    def _members(self, index: int) -> tuple[int, list[int]]:
        with self._plan_lock:  # the plan walks epochs lazily; reader and fetch-ahead threads share it
            return self.plan.batch_at(index)

    def _rows(self, members: list[int]) -> list[dict]:
        """The table rows of `members`, as dicts of the columns a batch reads."""
        # One take for many rows (prepare's 16 batches): ~10 us a row, where a scalar per field took ~50.
        columns = self.table.take(members).to_pydict()
        return [dict(zip(columns, values)) for values in zip(*columns.values())]

    def _wanted(self, index: int, fixed: bool, known: tuple | None = None):
        """Batch i's epoch, rows and picks, and the batch positions each store item fills, by stage.
        known: its (epoch, members, rows) when prepare has them."""
        epoch, members, rows = known or (*self._members(index), None)
        rows = rows if rows is not None else self._rows(members)
        picks = pick(rows, members, self.p, epoch, index, fixed)
        fills: dict[str, dict[str, list[int]]] = {stage: {} for stage in self.stages}
        for pos, chosen in enumerate(picks):
            fills[self.latents].setdefault(chosen["latent_key"], []).append(pos)
            if self.texts in fills and chosen["caption"] is None:
                fills[self.texts].setdefault(chosen["text_key"], []).append(pos)
        return rows, picks, fills

    def _locate(self, stage: str, keys: list[str]) -> list:
        with self._store_lock:
            return self.store.locate(stage, keys, self.fields[stage])

    def shards(self, index: int) -> list[tuple[str, str]]:
        """(stage, shard id) of every item batch i reads, for fetching ahead. In the shard_blocks order only
        the latents' shards, which its blocks walk; the other stages' items (text embeddings, in shards of
        their own hash order) are read by range where the server allows it, since a block uses a few items
        of each of their shards (decision 79)."""
        _, _, fills = self._wanted(index, False)
        found = dict.fromkeys((stage, loc.shard_id) for stage, items in fills.items()
                              for loc in self._locate(stage, list(items)) if loc is not None)
        if self.plan.layout is None:
            return list(found)
        return [(stage, shard_id) for stage, shard_id in found if stage == self.latents
                or getattr(self.cache_of(stage, shard_id), "ranges", None) is False]

    def prepare(self, indices) -> None:
        """Plan the coming batches and locate all their items with one lookup per stage.

        A lookup has a fixed cost (~0.3 ms) that a batch's handful of keys would pay alone.
        """
        planned = {index: self._members(index) for index in indices}
        every = self._rows([i for _, members in planned.values() for i in members])
        wanted, at = {}, 0
        for index, (epoch, members) in planned.items():
            wanted[index] = self._wanted(index, False, (epoch, members, every[at:at + len(members)]))
            at += len(members)
        found = {}
        for stage in self.stages:
            keys = list(dict.fromkeys(k for _, _, fills in wanted.values() for k in fills[stage]))
            found.update(((stage, k), loc) for k, loc in zip(keys, self._locate(stage, keys)))
        with self._store_lock:
            for index, (rows, picks, fills) in wanted.items():
                locs = {stage: [(k, found[(stage, k)]) for k in items] for stage, items in fills.items()}
                self._prepared[index] = (rows, picks, fills, locs)

    def fetch(self, index: int) -> None:
        """Start reading batch i's remote items that are read by range (the shard_blocks order's texts) on the
        I/O threads, so the reader finds their bytes there instead of waiting a round trip per item; call
        after `prepare` covered i. Only the bytes `read` would ask for, each once; nothing for a local store."""
        with self._store_lock:
            prepared = self._prepared.get(index)
        if self._io is None or prepared is None:
            return
        started = self._start(prepared[3])
        with self._store_lock:
            self._fetching[index] = started

    def _start(self, locs: dict) -> dict:
        """Range reads of the located items that `_open` would read by range, submitted to the I/O threads.
        Latents are left out: the fetch-ahead brings their shards whole (decision 79)."""
        started: dict = {}
        if self._io is None:
            return started
        for stage, pairs in locs.items():
            if stage == self.latents:
                continue
            for _, loc in pairs:
                cache = None if loc is None else self.cache_of(stage, loc.shard_id)
                if cache is None or cache.ranges is False or cache.local_path(loc.shard_id).exists():
                    continue
                future = self._io.submit(cache.read_range, stage, loc.shard_id, loc.offset, loc.offset + loc.length)
                started.setdefault((stage, loc.shard_id), []).append((loc.offset, loc.length, future))
        return started

    def close(self) -> None:
        """Drop the remote reads started for batches that will not be read (the feed is closing)."""
        with self._store_lock:
            fetching, self._fetching = self._fetching, {}
        for started in fetching.values():
            for items in started.values():
                for _, _, future in items:
                    future.cancel()

    def read(self, index: int, fixed: bool = False, known: dict | None = None, buffers: Buffers | None = None) -> dict:
        """Batch i's tensors in their stored dtype, or {"index", "damaged": [(stage, key, shard_id, why)]}.

        Each payload's tensors are read straight into their slots of the batch (one preadv per item,
        after its header), and the item's xxh3 is computed over what was read. `known`: payloads
        already read and checked elsewhere, by (stage, key). `buffers`: buffers to read into (`slots.Buffers`,
        maybe empty); then the result's "buffers" are the ones under its tensors, for the feed to reuse.
        """
        with self._store_lock:
            prepared = self._prepared.pop(index, None) if not fixed and not known else None
            started = self._fetching.pop(index, None) if not fixed and not known else None
        if prepared is None:
            rows, picks, fills = self._wanted(index, fixed)
            known = known or {}
            locs = {}
            for stage, items in fills.items():
                todo = [k for k in items if (stage, k) not in known]
                locs[stage] = list(zip(todo, self._locate(stage, todo)))
        else:
            rows, picks, fills, locs = prepared
        if started is None:  # not fetched ahead (no feed, a fixed batch, a re-read): this batch's items at once
            started = self._start(locs)
        slots = Slots(len(picks), self.pin_memory, masks=self.p.masked_loss, meta_stage=self.latents, buffers=buffers)
        damaged = []
        for stage, items in fills.items():
            by_shard: dict[str, list] = {}
            for key, loc in locs[stage]:
                if loc is None:
                    damaged.append((stage, key, None, "not in the store"))
                else:
                    by_shard.setdefault(loc.shard_id, []).append(loc)
            for shard_id, in_shard in by_shard.items():
                try:
                    shard = self._open(stage, shard_id, started.get((stage, shard_id), ()))
                except FileNotFoundError:
                    damaged += [(stage, loc.item_key, shard_id, "shard file missing") for loc in in_shard]
                    continue
                in_shard.sort(key=lambda l: l.offset)
                done = 0
                try:
                    for done, loc in enumerate(in_shard):
                        why = read_item(shard, loc, stage, items[loc.item_key], slots, self._headers,
                                        self._latent_hw(stage, items[loc.item_key], rows))
                        if why:
                            damaged.append((stage, loc.item_key, shard_id, why))
                except FileNotFoundError:  # a remote shard that vanished
                    damaged += [(stage, loc.item_key, shard_id, "shard file missing") for loc in in_shard[done:]]
                except Refused as e:
                    raise self._refused(stage, in_shard[done].item_key, shard_id, str(e)) from None
                finally:
                    shard.close()
            for key in items:
                if known and (stage, key) in known:
                    data = known[(stage, key)]
                    why = payloads.problem(stage, self.fields[stage], data, self._latent_hw(stage, items[key], rows))
                    try:
                        if why:
                            raise Refused(why)
                        slots.fill(stage, key, items[key], *decode_tensors(data, "pt"))
                    except Refused as e:
                        raise self._refused(stage, key, None, str(e)) from None
        lent = {"buffers": slots.buffers} if buffers is not None else {}
        if damaged:
            return {"index": index, "damaged": damaged, **lent}
        return {**slots.batch(picks[0]["latent_key"]), **conditioning(rows, picks), "index": index, **lent}

    def _latent_hw(self, stage: str, positions: list[int], rows: list[dict]) -> tuple[int, int] | None:
        """The (H/8, W/8) a latent item's bucket asks for (README.md, Payloads); None for other stages."""
        row = rows[positions[0]]
        if stage != self.latents or row.get("bucket_w") is None or row.get("bucket_h") is None:
            return None
        return int(row["bucket_h"]) // payloads.LATENT_FACTOR, int(row["bucket_w"]) // payloads.LATENT_FACTOR

    def _refused(self, stage: str, key: str, shard_id: str | None, problem: str) -> payloads.PayloadRefused:
        """The error for an item that breaks the payload schema, naming the store it was read from."""
        home = self.store.home(stage, shard_id) if shard_id and hasattr(self.store, "home") else self.store
        return payloads.PayloadRefused(home.url, stage, key, shard_id, problem)

    def cache_of(self, stage: str, shard_id: str) -> ShardCache | None:
        """The shard cache a located shard is read through (None: a local store's own file)."""
        home = self.store.home(stage, shard_id) if hasattr(self.store, "home") else self.store
        return self._caches.get(home.url)

    def _open(self, stage: str, shard_id: str, started=()):
        """A shard to read items from: the store's own file, a cached copy, or (not cached yet) ranges of
        the remote file, so a batch never waits for whole shards it needs a few items of. A server that
        answered a range with the whole shard (no range support) gets whole-shard fetches instead."""
        cache = self.cache_of(stage, shard_id)
        if cache is None:
            path = self._paths.get((stage, shard_id))
            if path is None:
                path = self._paths[(stage, shard_id)] = self.store.shard_path(stage, shard_id)
            return FileShard(path)
        path = cache.peek(shard_id) if cache.ranges is not False else cache.get(stage, shard_id)
        if path is not None:
            try:
                return FileShard(str(path))
            except FileNotFoundError:
                pass  # evicted between the look and the open
        return RemoteShard(cache, stage, shard_id, started)

    def recover(self, result: dict, fixed: bool = False) -> dict:
        """The batch, after reading its unusable items through the store; CacheDamaged if any has no intact copy."""
        known: dict = {}
        while "damaged" in result:
            lost: dict[str, list] = {}
            for stage, key, shard_id, why in result["damaged"]:
                cache = self.cache_of(stage, shard_id) if shard_id else None
                if cache is not None and why != "shard file missing":
                    cache.discard(shard_id)  # the local copy may be what is bad
                with self._store_lock:
                    data = self.store.read(stage, key, self.fields[stage])  # checks every copy, marks the bad ones
                if data is None:
                    lost.setdefault(stage, []).append((key, shard_id, why))
                else:
                    known[(stage, key)] = data
            if lost:
                raise _damaged(self.store.url, lost)
            result = self.read(result["index"], fixed, known, result.get("buffers"))
        return result

    def batch(self, index: int, fixed: bool = False) -> dict:
        """Batch i, read in this process (the fixed evaluation batches), in buffers of its own."""
        return self.recover(self.read(index, fixed), fixed)


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


def agree_on_damage(damage: CacheDamaged | None, device) -> CacheDamaged | None:
    """With several processes: the first damage any of them met this batch, on every process; else None.

    Called by every process at every micro-batch, so a damage stop on one process stops them all
    with the same error instead of leaving the others waiting at the next collective. One small
    all-reduce when nothing is damaged (the common case); the error itself only travels when one is.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return damage
    flag = torch.tensor([0 if damage is None else 1], device=device)
    dist.all_reduce(flag)
    if not int(flag.item()):
        return None
    mine = None if damage is None else (damage.items, damage.what, damage.hint)
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, mine)
    items, what, hint = next(f for f in found if f is not None)
    error = CacheDamaged(items, what)
    error.hint = hint
    return error


def open_source(table: pa.Table, store, p, plan, device="cpu", *, stages: dict) -> BatchSource:
    """Batches for a run of `stages` on `device`: in pinned memory for a CUDA device, so they copy to it
    asynchronously."""
    return BatchSource(table, store, p, plan, stages, pin_memory=torch.device(device).type == "cuda")
