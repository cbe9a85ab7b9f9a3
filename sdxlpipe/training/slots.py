"""One store item read straight into its slots of a batch, checked by xxh3.

`read_item` reads an item's safetensors header first, then one preadv puts
each tensor's bytes straight into its slot of the batch (`Slots`, shaped on
the first item's shapes, in the stored dtype, over byte buffers the feed
reuses batch after batch: decision 65) or a scratch buffer (masks, names the
batch does not use), and the xxh3 runs over exactly the bytes read.
Anything unusual (a long header, shapes unlike the batch's) reads the payload
whole and decodes it. An item that passes its checksum but breaks the payload
schema (`cache_format.payloads`) raises `Refused`: not damage, nothing to
recompute (decision 76). A shard is a local file (`FileShard`: the store's own,
or the shard cache's copy) or a remote one read by ranges (`RemoteShard`).
"""

from __future__ import annotations

import functools
import json
import math
import os

import numpy as np
import torch
import xxhash

from sdxlpipe.cache_format import decode_tensors, payloads
from sdxlpipe.cache_format.shard_cache import ShardCache

# Payload tensor name -> batch field (latents: mean, std, optional mask; texts: the two embeddings).
BATCH_FIELDS = {"mean": "mean", "std": "std", "prompt_embeds": "embeds", "pooled_prompt_embeds": "pooled"}
# safetensors dtype names -> torch dtypes an item is read straight into its slots in; others are decoded whole.
VIEW_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
               "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
               "BOOL": torch.bool}
# Bytes read first of each item: its safetensors length prefix and header (~200-300 bytes for ours);
# a longer header takes a second read.
HEADER_READ = 512


class Refused(Exception):
    """An item that passes its checksum but breaks the payload schema; `BatchSource` names store and shard."""


class Buffers:
    """The byte buffers under a batch's tensors ({field: flat uint8 tensor}) and the tensor and numpy views
    made of them, by (field, batch size, shape, dtype): what the feed's ring hands from batch to batch."""

    def __init__(self) -> None:
        self.flat: dict[str, torch.Tensor] = {}
        self.views: dict[tuple, tuple[torch.Tensor, np.ndarray]] = {}


class Slots:
    """A batch's tensors, shaped on the first item's shapes and filled slot by slot.

    `buffers` (from the feed's ring) back the batch's tensors when large enough, through views made once
    per shape; a field without one gets a new buffer. `buffers` then holds every buffer the batch uses,
    for the feed to reuse once the loop is done with the batch.
    """

    def __init__(self, size: int, pin_memory: bool, masks: bool, meta_stage: str, buffers: Buffers | None = None):
        """meta_stage: the stage whose items' metadata the batch carries (the latents' scaling factor)."""
        self.size, self.pin_memory, self.masks, self.meta_stage = size, pin_memory, masks, meta_stage
        self.buffers = buffers if buffers is not None else Buffers()
        self.tensors: dict[str, torch.Tensor] = {}
        self.rows: dict[str, np.ndarray] = {}  # field -> (size, bytes per sample) uint8 view of its tensor
        self.layout: dict[str, tuple] = {}  # field -> (per-sample shape, dtype) of its tensor
        self.mask_of: dict[int, torch.Tensor] = {}  # position -> its stored mask
        self.meta: dict[str, dict] = {}  # latent key -> safetensors metadata

    def _shape(self, field: str, shape: tuple, dtype) -> torch.Tensor | None:
        """The batch tensor of `field` (made on first use, over its buffer); None when `shape` or `dtype`
        differs from the batch's."""
        t = self.tensors.get(field)
        if t is None:
            shape = tuple(shape)
            view = self.buffers.views.get((field, self.size, shape, dtype))
            if view is None:
                nbytes = self.size * math.prod(shape) * dtype.itemsize
                buf = self.buffers.flat.get(field)
                if buf is None or buf.numel() < nbytes:
                    buf = self.buffers.flat[field] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)
                    self.buffers.views = {k: v for k, v in self.buffers.views.items() if k[0] != field}
                view = self.buffers.views[(field, self.size, shape, dtype)] = (
                    buf[:nbytes].view(dtype).view(self.size, *shape), buf[:nbytes].numpy().reshape(self.size, -1))
            t = self.tensors[field] = view[0]
            self.rows[field] = view[1]
            self.layout[field] = (shape, dtype)
        elif self.layout[field] != (shape, dtype):
            return None
        return t

    def unshape(self, field: str) -> None:
        """Forget the shape of `field`'s tensor (its buffer stays), so the next item shapes it."""
        del self.tensors[field], self.rows[field], self.layout[field]

    def slot(self, field: str, pos: int, shape: tuple, dtype) -> torch.Tensor | None:
        """The batch slot of `field` at position `pos`; None when the shape or dtype differs from the batch's."""
        t = self._shape(field, shape, dtype)
        return None if t is None else t[pos]

    def dest(self, field: str, pos: int, shape: tuple, dtype) -> np.ndarray | None:
        """The bytes of that slot, for preadv to read into (a numpy view: cheaper than a tensor's per item)."""
        if self.layout.get(field) != (shape, dtype) and self._shape(field, shape, dtype) is None:
            return None
        return self.rows[field][pos]

    def fill(self, stage: str, key: str, positions: list[int], tensors: dict, meta: dict) -> None:
        """Copy a decoded payload into its slots (items that are not read straight into them)."""
        for name, t in tensors.items():
            if name == "mask":
                self.mask_of.update(dict.fromkeys(positions, t))
            elif name in BATCH_FIELDS:
                for pos in positions:
                    slot = self.slot(BATCH_FIELDS[name], pos, tuple(t.shape), t.dtype)
                    if slot is None and tuple(self.tensors[BATCH_FIELDS[name]].shape[1:]) != tuple(t.shape):
                        raise Refused(f"{name} has shape {list(t.shape)}, other items of its batch "
                                      f"{list(self.tensors[BATCH_FIELDS[name]].shape[1:])}")
                    (slot if slot is not None else self.tensors[BATCH_FIELDS[name]][pos]).copy_(t)
        if stage == self.meta_stage:
            self.meta[key] = meta

    def batch(self, first_latent: str) -> dict:
        meta = self.meta[first_latent]
        mask = None
        if self.masks:  # fp32: a stored mask where there is one, else ones
            mean = self.tensors["mean"]
            mask = torch.ones((self.size, 1, *mean.shape[2:]), dtype=torch.float32, pin_memory=self.pin_memory)
            for pos, m in self.mask_of.items():
                mask[pos].copy_(m.reshape(mask.shape[1:]))
        return {"mean": self.tensors["mean"], "std": self.tensors["std"],
                "embeds": self.tensors.get("embeds"), "pooled": self.tensors.get("pooled"), "mask": mask,
                "scale": float(meta.get("scaling_factor", "1.0")),
                "shift": float(meta.get("shift_factor", "0.0") or 0.0)}


def read_item(shard, loc, stage: str, positions: list[int], slots: Slots, headers: dict | None = None,
              latent_hw: tuple[int, int] | None = None) -> str | None:
    """Read one item into its batch slots and check its xxh3; why it is damaged, or None. An item that
    passes its checksum but breaks the payload schema raises `Refused` (latent_hw: the (H/8, W/8) its
    bucket asks of a latent).

    The common case: the header is read first, then one preadv puts each tensor's bytes straight
    into its slot (or a scratch buffer: masks, names the batch does not use), and the hash runs over
    exactly the bytes read. `headers` ({stage: the last header read, length prefix included}, shared
    by the batches of a run): an item as long as the last one of its stage is read in one preadv on the
    guess that its header is the same bytes (the items of a bucket have the same shapes and metadata),
    which is then checked; a wrong guess reads it again the common way. Anything unusual (a long header,
    shapes unlike the batch's) reads the payload whole and decodes it.
    """
    guess, parsed = headers.get(stage, (None, None)) if headers is not None else (None, None)
    if guess is not None and len(guess) < loc.length:
        shaped = len(slots.tensors)
        plan = _place(parsed, len(guess), loc.length, positions[0], slots)
        if plan is not None:
            head = bytearray(len(guess))
            if shard.readinto([head, *plan[0]], loc.offset) == loc.length and head == guess:
                return _check(head, plan, loc, stage, positions, slots, latent_hw)
        for field in list(slots.tensors)[shaped:]:  # shaped on the wrong guess: the item's header shapes them
            slots.unshape(field)
    head = bytearray(min(HEADER_READ, loc.length))
    got = shard.readinto([head], loc.offset)
    if got != len(head):
        return f"truncated: {got} of {loc.length} bytes"
    size = int.from_bytes(head[:8], "little") if len(head) >= 8 else loc.length
    plan = _layout(head, size, loc.length, positions[0], slots) if 8 + size <= len(head) else None
    if plan is None:
        return _read_whole(shard, loc, stage, positions, slots, latent_hw)
    dests = plan[0]
    got = shard.readinto(dests, loc.offset + 8 + size) if dests else 0
    want = loc.length - 8 - size
    if got != want:
        return f"truncated: {8 + size + got} of {loc.length} bytes"
    why = _check(memoryview(head)[:8 + size], plan, loc, stage, positions, slots, latent_hw)
    if why is None and headers is not None:
        headers[stage] = (bytes(head[:8 + size]), _parse_header(bytes(head[8:8 + size])))
    return why


def _check(head, plan, loc, stage: str, positions: list[int], slots: Slots, latent_hw=None) -> str | None:
    """The xxh3 of the header and the bytes read into `plan`'s buffers against the index's, then the
    payload schema; then the copies for an item used twice, its mask and metadata."""
    dests, fields, masks, meta = plan
    digest = xxhash.xxh3_128(head)
    for d in dests:
        digest.update(d)
    if digest.hexdigest() != loc.xxh3:
        return "checksum mismatch"
    why = _schema_problem(stage, loc.field, bytes(head[8:]), loc.length - len(head), latent_hw)
    if why:
        raise Refused(why)
    for field in fields:  # the same item used twice in the batch
        for pos in positions[1:]:
            slots.tensors[field][pos].copy_(slots.tensors[field][positions[0]])
    for buf, dtype, shape in masks:
        slots.mask_of.update(dict.fromkeys(positions, torch.frombuffer(buf, dtype=dtype).reshape(shape)
                                           if buf.nbytes else torch.empty(shape, dtype=dtype)))
    if stage == slots.meta_stage:
        slots.meta[loc.item_key] = meta
    return None


def _layout(head: bytes | bytearray, size: int, length: int, pos: int, slots: Slots):
    """Where each tensor of the payload goes: ([writable buffers in data order], [batch fields filled],
    [(mask buffer, dtype, shape)], metadata); None when the header is not one this reads straight into slots."""
    return _place(_parse_header(bytes(head[8:8 + size])), 8 + size, length, pos, slots)


def _place(parsed, start: int, length: int, pos: int, slots: Slots):
    """`_layout` of a parsed header whose data starts at byte `start` of the item."""
    if parsed is None or start + parsed[2] != length:
        return None
    entries, meta, _ = parsed
    dests, fields, masks = [], [], []
    for name, dtype, shape, nbytes in entries:
        field = BATCH_FIELDS.get(name)
        if field is not None:
            dest = slots.dest(field, pos, shape, dtype)
            if dest is None:
                return None
            dests.append(dest)
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


@functools.lru_cache(maxsize=256)
def _schema_problem(stage: str, field: str, text: bytes, data_bytes: int, latent_hw) -> str | None:
    """`payloads.header_problem` of a header's JSON text; cached, as the items of a bucket share their header."""
    try:
        header = json.loads(text)
    except ValueError as e:
        return f"its safetensors header is not JSON ({e})"
    return payloads.header_problem(stage, field, header, data_bytes, latent_hw)


def _read_whole(shard, loc, stage: str, positions: list[int], slots: Slots, latent_hw=None) -> str | None:
    data = bytearray(loc.length)
    got = shard.readinto([data], loc.offset)
    if got != loc.length:
        return f"truncated: {got} of {loc.length} bytes"
    if xxhash.xxh3_128_hexdigest(data) != loc.xxh3:
        return "checksum mismatch"
    why = payloads.problem(stage, loc.field, data, latent_hw)
    if why:
        raise Refused(why)
    slots.fill(stage, loc.item_key, positions, *decode_tensors(bytes(data), "pt"))
    return None


class FileShard:
    """A shard file on this machine (a local store's, or the shard cache's copy)."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY)

    def readinto(self, buffers: list, offset: int) -> int:
        return os.preadv(self.fd, buffers, offset)

    def close(self) -> None:
        os.close(self.fd)


class RemoteShard:
    """A remote shard not in the cache yet: each read is a range request, or part of one already started.

    started: [(offset, length, future)] of whole items whose range reads the I/O threads started
    (`BatchSource.fetch`); a read inside one of them waits for it, and its errors are the range request's.
    """

    def __init__(self, cache: ShardCache, stage: str, shard_id: str, started=()):
        self.cache, self.stage, self.shard_id, self.started = cache, stage, shard_id, started

    def readinto(self, buffers: list, offset: int) -> int:
        size = sum(memoryview(b).nbytes for b in buffers)
        for start, length, future in self.started:
            if start <= offset and offset + size <= start + length:
                data = memoryview(future.result())[offset - start:offset - start + size]
                break
        else:
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
