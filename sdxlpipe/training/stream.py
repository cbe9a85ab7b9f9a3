"""Training data streamed from the store: each batch's payloads are read when the batch is due.

Recipe for batch i: the plan names its samples (`data.BatchPlan`), `batches.pick`
makes their seeded choices and so names the store items it needs,
`Store.locate` gives each item's (shard, offset, length, xxh3) (for 16
batches at a time: one lookup has a fixed cost), each item's safetensors
header is read, then one preadv puts its tensors' bytes straight into their
slots of the batch, and the xxh3 runs over exactly the bytes read. The
micro-conditioning comes from `batches.conditioning`, the function the
in-memory path (`batches.assemble`) uses, so the tensors are equal.

Batches are delivered in the stored dtype (fp16: half the bytes to copy, to
pin and to send to a GPU); the loop makes them fp32 (`batches.as_float`).
`Feed` reads ahead in `loader_workers` threads of the training process, at
most workers x prefetch batches: preadv and the tensor copies release the GIL,
and nothing crosses a process boundary (worker processes handed a 4.5 MB
batch over shared memory at ~16 batches/s on a 2-core VM; decision 39). A
remote store's shards come through the local `ShardCache`; a thread fetches
the shards of the coming batches ahead, in plan order, within the cache's
byte limit, and an item whose shard is not cached yet is read by a range
request, so the first batch never waits for whole shards. Memory holds the
table, the plan and a few batches, never the dataset.

Damage (docs/decisions.md 31): an item failing its checksum, truncated, or in
a vanished shard makes the reader hand the batch back marked damaged; `take`
reads the item through `Store.read` (every copy is checked, bad ones are
marked in the store). An intact copy is used; with none, the run stops with
`CacheDamaged` naming the item, and the pipeline runner recomputes it
(`sdxlpipe run encode`) and resumes training from the last checkpoint. With
several processes, `agree_on_damage` makes every process stop with that error.
"""

from __future__ import annotations

import functools
import json
import math
import os
import threading
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch
import xxhash

from sdxlpipe.cache_format import CacheDamaged, decode_tensors
from sdxlpipe.cache_format.shard_cache import ShardCache, default_directory
from sdxlpipe.training.batches import conditioning, decode_latent, decode_text, pick  # noqa: F401 (tests use the decoders)

LATENTS, TEXTS = "vae_encode", "text_encode"
# The store field each stage writes its payload to (stages/vae_encode.py, text_encode.py FIELD): naming
# it lets `Store.locate` answer a batch's keys with one vectorised lookup.
FIELDS = {LATENTS: "latent.safetensors", TEXTS: "text.safetensors"}
# The table columns `batches.pick` and `batches.assemble` read.
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
    """Reads batch i of the run from the store; safe to call from several reader threads at once."""

    def __init__(self, table: pa.Table, store, p, plan, cache: ShardCache | None, pin_memory: bool = False):
        self.store, self.p, self.plan, self.cache, self.pin_memory = store, p, plan, cache, pin_memory
        # Only the columns a batch reads: taking a batch's rows then costs what those need.
        self.table = table.select([c for c in ROW_COLUMNS if c in table.column_names])
        self.stages = (LATENTS,) if p.train_text_encoder else (LATENTS, TEXTS)
        absent = {stage: store.missing(stage, keys) for stage, keys in _run_keys(table, self.stages).items()}
        if any(absent.values()):
            # Known before any step: the runner recomputes them and runs the train stage again.
            raise CacheDamaged({s: k for s, k in absent.items() if k},
                               f"{sum(map(len, absent.values()))} cached item(s) the run needs are missing from "
                               f"{store.url} or were found damaged")
        # The store's index is shared by the reader threads; `recover` marks bad copies in it.
        self._store_lock = threading.Lock()
        self._plan_lock = threading.Lock()
        self._columns = {name: self.table.column(name) for name in self.table.column_names}
        self._prepared: dict[int, tuple] = {}  # batch index -> (rows, picks, fills, locations), see `prepare`

    def _wanted(self, index: int, fixed: bool):
        """Batch i's epoch, rows and picks, and the batch positions each store item fills, by stage."""
        with self._plan_lock:  # the plan walks epochs lazily; reader and fetch-ahead threads share it
            epoch, members = self.plan.batch_at(index)
        # Element by element: a few rows cost ~0.2 ms this way, ~1 ms through Table.take().to_pylist().
        rows = [{name: column[i].as_py() for name, column in self._columns.items()} for i in members]
        picks = pick(rows, members, self.p, epoch, index, fixed)
        fills: dict[str, dict[str, list[int]]] = {stage: {} for stage in self.stages}
        for pos, chosen in enumerate(picks):
            fills[LATENTS].setdefault(chosen["latent_key"], []).append(pos)
            if TEXTS in fills and chosen["caption"] is None:
                fills[TEXTS].setdefault(chosen["text_key"], []).append(pos)
        return rows, picks, fills

    def _locate(self, stage: str, keys: list[str]) -> list:
        with self._store_lock:
            return self.store.locate(stage, keys, FIELDS[stage])

    def shards(self, index: int) -> list[tuple[str, str]]:
        """(stage, shard id) of every item batch i reads, for fetching ahead."""
        _, _, fills = self._wanted(index, False)
        return list(dict.fromkeys((stage, loc.shard_id) for stage, items in fills.items()
                                  for loc in self._locate(stage, list(items)) if loc is not None))

    def prepare(self, indices) -> None:
        """Plan the coming batches and locate all their items with one lookup per stage.

        A lookup has a fixed cost (~0.3 ms) that a batch's handful of keys would pay alone.
        """
        wanted = {index: self._wanted(index, False) for index in indices}
        found = {}
        for stage in self.stages:
            keys = list(dict.fromkeys(k for _, _, fills in wanted.values() for k in fills[stage]))
            found.update(((stage, k), loc) for k, loc in zip(keys, self._locate(stage, keys)))
        with self._store_lock:
            for index, (rows, picks, fills) in wanted.items():
                locs = {stage: [(k, found[(stage, k)]) for k in items] for stage, items in fills.items()}
                self._prepared[index] = (rows, picks, fills, locs)

    def read(self, index: int, fixed: bool = False, known: dict | None = None) -> dict:
        """Batch i's tensors in their stored dtype, or {"index", "damaged": [(stage, key, shard_id, why)]}.

        Each payload's tensors are read straight into their slots of the batch (one preadv per item,
        after its header), and the item's xxh3 is computed over what was read. `known`: payloads
        already read and checked elsewhere, by (stage, key).
        """
        with self._store_lock:
            prepared = self._prepared.pop(index, None) if not fixed and not known else None
        if prepared is None:
            rows, picks, fills = self._wanted(index, fixed)
            known = known or {}
            locs = {}
            for stage, items in fills.items():
                todo = [k for k in items if (stage, k) not in known]
                locs[stage] = list(zip(todo, self._locate(stage, todo)))
        else:
            rows, picks, fills, locs = prepared
        slots = _Slots(len(picks), self.pin_memory, masks=self.p.masked_loss)
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
                    shard = self._open(stage, shard_id)
                except FileNotFoundError:
                    damaged += [(stage, loc.item_key, shard_id, "shard file missing") for loc in in_shard]
                    continue
                in_shard.sort(key=lambda l: l.offset)
                done = 0
                try:
                    for done, loc in enumerate(in_shard):
                        why = _read_item(shard, loc, stage, items[loc.item_key], slots)
                        if why:
                            damaged.append((stage, loc.item_key, shard_id, why))
                except FileNotFoundError:  # a remote shard that vanished
                    damaged += [(stage, loc.item_key, shard_id, "shard file missing") for loc in in_shard[done:]]
                finally:
                    shard.close()
            for key in items:
                if known and (stage, key) in known:
                    slots.fill(stage, key, items[key], *decode_tensors(known[(stage, key)], "pt"))
        if damaged:
            return {"index": index, "damaged": damaged}
        return {**slots.batch(picks[0]["latent_key"]), **conditioning(rows, picks), "index": index}

    def _open(self, stage: str, shard_id: str):
        """A shard to read items from: the store's own file, a cached copy, or (not cached yet) ranges of
        the remote file, so a batch never waits for whole shards it needs a few items of."""
        if self.cache is None:
            return _FileShard(os.path.join(self.store.root, "shards", stage, f"{shard_id}.tar"))
        path = self.cache.peek(shard_id)
        if path is not None:
            try:
                return _FileShard(str(path))
            except FileNotFoundError:
                pass  # evicted between the look and the open
        return _RemoteShard(self.cache, stage, shard_id)

    def recover(self, result: dict, fixed: bool = False) -> dict:
        """The batch, after reading its unusable items through the store; CacheDamaged if any has no intact copy."""
        known: dict = {}
        while "damaged" in result:
            lost: dict[str, list] = {}
            for stage, key, shard_id, why in result["damaged"]:
                if self.cache is not None and shard_id and why != "shard file missing":
                    self.cache.discard(shard_id)  # the local copy may be what is bad
                with self._store_lock:
                    data = self.store.read(stage, key, FIELDS[stage])  # checks every copy, marks the bad ones
                if data is None:
                    lost.setdefault(stage, []).append((key, shard_id, why))
                else:
                    known[(stage, key)] = data
            if lost:
                raise _damaged(self.store.url, lost)
            result = self.read(result["index"], fixed, known)
        return result

    def batch(self, index: int, fixed: bool = False) -> dict:
        """Batch i, read in this process (the fixed evaluation batches)."""
        return self.recover(self.read(index, fixed), fixed)


# Payload tensor name -> batch field (latents: mean, std, optional mask; texts: the two embeddings).
BATCH_FIELDS = {"mean": "mean", "std": "std", "prompt_embeds": "embeds", "pooled_prompt_embeds": "pooled"}
REQUIRED = {LATENTS: ("mean", "std"), TEXTS: ("embeds", "pooled")}
# safetensors dtype names -> torch dtypes an item is read straight into its slots in; others are decoded whole.
VIEW_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
               "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
               "BOOL": torch.bool}
# Batches planned and located together (`BatchSource.prepare`): 16 cut the per-batch lookup cost ~4x
# and hold a few KB.
PREPARE_BATCHES = 16
# Bytes read first of each item: its safetensors length prefix and header (~200-300 bytes for ours);
# a longer header takes a second read.
HEADER_READ = 512


class _Slots:
    """A batch's tensors, allocated on the first item's shapes and filled slot by slot."""

    def __init__(self, size: int, pin_memory: bool, masks: bool):
        self.size, self.pin_memory, self.masks = size, pin_memory, masks
        self.tensors: dict[str, torch.Tensor] = {}
        self.mask_of: dict[int, torch.Tensor] = {}  # position -> its stored mask
        self.meta: dict[str, dict] = {}  # latent key -> safetensors metadata

    def slot(self, field: str, pos: int, shape: tuple, dtype) -> torch.Tensor | None:
        """The batch slot of `field` at position `pos`; None when the shape or dtype differs from the batch's."""
        t = self.tensors.get(field)
        if t is None:
            t = self.tensors[field] = torch.empty((self.size, *shape), dtype=dtype, pin_memory=self.pin_memory)
        elif tuple(t.shape[1:]) != shape or t.dtype != dtype:
            return None
        return t[pos]

    def fill(self, stage: str, key: str, positions: list[int], tensors: dict, meta: dict) -> None:
        """Copy a decoded payload into its slots (items that are not read straight into them)."""
        for name, t in tensors.items():
            if name == "mask":
                self.mask_of.update(dict.fromkeys(positions, t))
            elif name in BATCH_FIELDS:
                for pos in positions:
                    slot = self.slot(BATCH_FIELDS[name], pos, tuple(t.shape), t.dtype)
                    if slot is None and tuple(self.tensors[BATCH_FIELDS[name]].shape[1:]) != tuple(t.shape):
                        raise ValueError(f"cached {stage} item {key}: {name} has shape {tuple(t.shape)}, other "
                                         f"items of its batch {tuple(self.tensors[BATCH_FIELDS[name]].shape[1:])}")
                    (slot if slot is not None else self.tensors[BATCH_FIELDS[name]][pos]).copy_(t)
        if stage == LATENTS:
            self.meta[key] = meta

    def batch(self, first_latent: str) -> dict:
        meta = self.meta[first_latent]
        mask = None
        if self.masks:  # fp32, as `assemble` makes it: a stored mask where there is one, else ones
            mean = self.tensors["mean"]
            mask = torch.ones((self.size, 1, *mean.shape[2:]), dtype=torch.float32, pin_memory=self.pin_memory)
            for pos, m in self.mask_of.items():
                mask[pos].copy_(m.reshape(mask.shape[1:]))
        return {"mean": self.tensors["mean"], "std": self.tensors["std"],
                "embeds": self.tensors.get("embeds"), "pooled": self.tensors.get("pooled"), "mask": mask,
                "scale": float(meta.get("scaling_factor", "1.0")),
                "shift": float(meta.get("shift_factor", "0.0") or 0.0)}


def _read_item(shard, loc, stage: str, positions: list[int], slots: _Slots) -> str | None:
    """Read one item into its batch slots and check its xxh3; why it is unusable, or None.

    The common case: the header is read first, then one preadv puts each tensor's bytes straight
    into its slot (or a scratch buffer: masks, names the batch does not use), and the hash runs over
    exactly the bytes read. Anything unusual (a long header, shapes unlike the batch's) reads the
    payload whole and decodes it.
    """
    head = bytearray(min(HEADER_READ, loc.length))
    got = shard.readinto([head], loc.offset)
    if got != len(head):
        return f"truncated: {got} of {loc.length} bytes"
    size = int.from_bytes(head[:8], "little") if len(head) >= 8 else loc.length
    plan = _layout(head, size, loc.length, positions[0], slots) if 8 + size <= len(head) else None
    if plan is None:
        return _read_whole(shard, loc, stage, positions, slots)
    dests, fields, masks, meta = plan
    got = shard.readinto(dests, loc.offset + 8 + size) if dests else 0
    want = loc.length - 8 - size
    if got != want:
        return f"truncated: {8 + size + got} of {loc.length} bytes"
    digest = xxhash.xxh3_128(memoryview(head)[:8 + size])
    for d in dests:
        digest.update(d)
    if digest.hexdigest() != loc.xxh3:
        return "checksum mismatch"
    for field in fields:  # the same item used twice in the batch
        for pos in positions[1:]:
            slots.tensors[field][pos].copy_(slots.tensors[field][positions[0]])
    for buf, dtype, shape in masks:
        slots.mask_of.update(dict.fromkeys(positions, torch.frombuffer(buf, dtype=dtype).reshape(shape)
                                           if buf.nbytes else torch.empty(shape, dtype=dtype)))
    if stage == LATENTS:
        slots.meta[loc.item_key] = meta
    return None


def _layout(head: bytearray, size: int, length: int, pos: int, slots: _Slots):
    """Where each tensor of the payload goes: ([writable buffers in data order], [batch fields filled],
    [(mask buffer, dtype, shape)], metadata); None when the header is not one this reads straight into slots."""
    parsed = _parse_header(bytes(head[8:8 + size]))
    if parsed is None or 8 + size + parsed[2] != length:
        return None
    entries, meta, _ = parsed
    dests, fields, masks = [], [], []
    for name, dtype, shape, nbytes in entries:
        field = BATCH_FIELDS.get(name)
        if field is not None:
            slot = slots.slot(field, pos, shape, dtype)
            if slot is None:
                return None
            dests.append(slot.reshape(-1).view(torch.uint8).numpy())
            fields.append(field)
        else:
            buf = np.empty(nbytes, np.uint8)
            dests.append(buf)
            if name == "mask":
                masks.append((buf, dtype, shape))
    return [d for d in dests if d.nbytes], fields, masks, meta


@functools.lru_cache(maxsize=64)
def _parse_header(text: bytes):
    """A safetensors header's tensors in data order [(name, dtype, shape, bytes)], metadata and data length;
    None unless every tensor has a known dtype and they tile the data exactly.

    Cached: the items of one run share a handful of headers (same shapes, same metadata).
    """
    try:
        header = json.loads(text)
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            return None
        entries, end = [], 0
        for name, spec in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype, (lo, hi), shape = VIEW_DTYPES[spec["dtype"]], spec["data_offsets"], tuple(spec["shape"])
            if not all(type(d) is int and d >= 0 for d in shape) or lo != end or hi - lo != math.prod(shape) * dtype.itemsize:
                return None
            entries.append((name, dtype, shape, hi - lo))
            end = hi
        return entries, meta, end
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None


def _read_whole(shard, loc, stage: str, positions: list[int], slots: _Slots) -> str | None:
    data = bytearray(loc.length)
    got = shard.readinto([data], loc.offset)
    if got != loc.length:
        return f"truncated: {got} of {loc.length} bytes"
    if xxhash.xxh3_128_hexdigest(data) != loc.xxh3:
        return "checksum mismatch"
    slots.fill(stage, loc.item_key, positions, *decode_tensors(bytes(data), "pt"))
    return None


class _FileShard:
    """A shard file on this machine (a local store's, or the shard cache's copy)."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY)

    def readinto(self, buffers: list, offset: int) -> int:
        return os.preadv(self.fd, buffers, offset)

    def close(self) -> None:
        os.close(self.fd)


class _RemoteShard:
    """A remote shard not in the cache yet: each read is a range request."""

    def __init__(self, cache: ShardCache, stage: str, shard_id: str):
        self.cache, self.stage, self.shard_id = cache, stage, shard_id

    def readinto(self, buffers: list, offset: int) -> int:
        size = sum(memoryview(b).nbytes for b in buffers)
        data = memoryview(self.cache.read_range(self.stage, self.shard_id, offset, offset + size))
        at = 0
        for b in buffers:
            view = memoryview(b).cast("B")
            part = data[at:at + view.nbytes]
            view[:len(part)] = part
            at += len(part)
        return at

    def close(self) -> None:
        pass


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


class Feed:
    """This process's batches, in order, read ahead by `workers` reader threads; `take(i)` returns batch i.

    At most workers x prefetch batches are read ahead. With 0 workers `take` reads the batch itself.
    """

    def __init__(self, source: BatchSource, indices: range, workers: int, prefetch: int):
        self.source, self.indices = source, indices
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="sdxlpipe-reader") if workers else None
        self._limit = workers * prefetch
        self._ahead: deque[Future] = deque()
        self._submitted = 0  # positions handed to the readers so far
        self._consumed = 0
        self._moved = threading.Condition()
        self._stop = False
        self._thread = None
        if source.cache is not None and len(indices):
            self._thread = threading.Thread(target=self._fetch_ahead, name="sdxlpipe-shard-prefetch", daemon=True)
            self._thread.start()
        self._read_ahead()

    def _prepare(self, position: int) -> None:
        if position % PREPARE_BATCHES == 0:
            self.source.prepare(self.indices[position:position + PREPARE_BATCHES])

    def _read_ahead(self) -> None:
        while self._pool is not None and self._submitted < len(self.indices) and len(self._ahead) < self._limit:
            self._prepare(self._submitted)
            self._ahead.append(self._pool.submit(self.source.read, self.indices[self._submitted]))
            self._submitted += 1

    def take(self, index: int) -> dict:
        if self._pool is None:
            self._prepare(self._consumed)
            result = self.source.read(self.indices[self._consumed])
        else:
            future = self._ahead.popleft()
            self._read_ahead()  # keep the readers busy while this one is waited for
            result = future.result()
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
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)  # a reader finishes the batch it is on
        if self.source.cache is not None and self.source.cache.directory.is_dir():
            # The window fetched ahead may pass the limit by a batch's shards; nothing is held now.
            self.source.cache.evict()


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


def open_source(table: pa.Table, store, p, plan, device="cpu") -> BatchSource:
    """Batches for a run on `device`: in pinned memory for a CUDA device, so they copy to it asynchronously."""
    return BatchSource(table, store, p, plan, shard_cache(store, p), pin_memory=torch.device(device).type == "cuda")


def open_feed(source: BatchSource, p, *, start_step: int, max_steps: int, world: int, rank: int, device) -> Feed:
    """This process's feed of batches s*N*A + a*N + r (decisions.md 12) for steps start_step..max_steps-1."""
    per_step = p.gradient_accumulation_steps * world
    indices = range(start_step * per_step + rank, max_steps * per_step, world)
    return Feed(source, indices, p.loader_workers, prefetch=p.loader_prefetch)
