"""The shard writer: `Writer` packs a stage's items into shards and commits each.

An item is committed whole or not at all; each full shard is committed as
README.md says (shard, then manifest, then index fragment: the commit point)
through `Store.add_shard`. Get one from `Store.writer(stage)`.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

import pyarrow as pa

from .grammar import GROUPED_SCHEMA, HEX_LEN, is_key
from .shards import ShardBuilder, StoreError, check_item_name, is_local, manifest, member_bytes

if TYPE_CHECKING:
    from .store import Store

# A live writer touches its temp file this often, so gc never takes an idle writer's file
# (the Ray driver holds one builder for a whole stream); well under the grace period.
DEFAULT_KEEPALIVE_SECONDS = 300.0

log = logging.getLogger("sdxlpipe.store")


def commit(store: Store, stage: str, builder: ShardBuilder, group: str = "") -> str:
    """Shard, then manifest, then index fragment (the commit point). Returns the shard id."""
    try:
        try:
            shard_id, nbytes = builder.finish()
            names = [m["name"].split(".", 1) for m in builder.members]
            table = pa.table({
                "item_key": [n[0] for n in names], "field": [n[1] for n in names],
                "shard_id": [shard_id] * len(names), "offset": [m["offset"] for m in builder.members],
                "length": [m["length"] for m in builder.members], "xxh3": [m["xxh3"] for m in builder.members],
                "group": [group] * len(names),
            }, schema=GROUPED_SCHEMA)
            return store.add_shard(stage, builder.path, manifest(stage, shard_id, nbytes, builder.members), table)
        finally:
            builder.discard()
    except OSError as e:  # discarding the temp tar may fail too: still the same error for the user
        raise write_error(store, stage, e) from e


def write_error(store: Store, stage: str, e: OSError) -> StoreError:
    return StoreError(
        f"could not write to store {store.url} (stage {stage}): {e.strerror or e}"
        + (f": {e.filename}" if e.filename else ""),
        "free space (or fix permissions) where the store and its tmp/ live, then run the same "
        "command again: items committed so far are kept, the unfinished shard is never visible",
    )


class Writer:
    """Packs items into shards for one stage; use as `with store.writer(stage) as w: w.add(...)`.

    All fields of an item go into the same shard, added one after another, so that
    webdataset sees each item as one sample. An item is committed whole or not at all:
    its fields wait in memory until the next item starts, `end_item()` or `close()`, and a
    writer left by an exception commits the finished items and drops the one in progress.
    """

    def __init__(self, store: Store, stage: str, target_shard_bytes: int, group: str = "",
                 keepalive_seconds: float = DEFAULT_KEEPALIVE_SECONDS):
        if target_shard_bytes <= 0:
            raise StoreError(f"target_shard_bytes must be positive, got {target_shard_bytes}",
                             "leave it at the default unless shards must be smaller")
        self._store = store
        self.stage = stage
        self.group = group  # recorded in the index beside each item (model fingerprint, for du)
        self.target_shard_bytes = target_shard_bytes
        self.keepalive_seconds = keepalive_seconds
        self.shard_ids: list[str] = []
        self._builder: ShardBuilder | None = None
        self._keepalive: threading.Event | None = None  # set to stop touching the builder's file
        self._key: str | None = None  # the item being added
        self._pending: list[tuple[str, str, bytes]] = []  # its (name, field, payload) so far
        self._done: set[str] = set()  # items already complete in the current shard

    def add(self, item_key: str, field: str, payload: bytes) -> None:
        if not is_key(item_key):
            raise StoreError(f"item key {item_key!r} of stage {self.stage} is not {HEX_LEN} lowercase hex digits",
                             "item keys are xxh3-128 hex digests: make them with sdxlpipe.pipeline.keys.xxh3_hex")
        name = check_item_name(item_key, field)
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload of {name} must be bytes, got {type(payload).__name__}; "
                            "encode it with encode_tensors or encode_json")
        if item_key != self._key:
            self.end_item()
            if item_key in self._done:
                raise StoreError(
                    f"item {item_key} of stage {self.stage} was added again after other items",
                    "add all fields of an item one after another",
                )
            self._key = item_key
        if any(f == field for _, f, _ in self._pending):
            raise StoreError(f"field {field} of item {item_key} was added twice",
                             "add each field of an item once")
        self._pending.append((name, field, bytes(payload)))

    def end_item(self) -> None:
        """The item being added is complete: it goes into the shard (and is kept on errors)."""
        pending, key = self._pending, self._key
        self._pending, self._key = [], None
        if not pending:
            return
        size = sum(member_bytes(len(p)) for _, _, p in pending)
        if self._builder is not None and self._builder.members and \
                self._builder.size + size > self.target_shard_bytes:
            self._flush()
        try:
            if self._builder is None:
                self._builder = ShardBuilder(self._store.temp_dir())
                self._start_keepalive(self._builder.path)
            for name, _, payload in pending:
                self._builder.add(name, payload)
        except OSError as e:
            # The temp tar may now end mid-member: nothing of it can be committed.
            self._discard()
            raise write_error(self._store, self.stage, e) from e
        self._done.add(key)

    def _discard(self) -> None:
        builder, self._builder = self._builder, None
        self._stop_keepalive()
        self._done = set()
        if builder is not None:
            builder.discard()

    def _stop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.set()
            self._keepalive = None

    def _start_keepalive(self, path: str) -> None:
        # Only a local store keeps the builder in its tmp/, where gc looks.
        if not is_local(self._store.fs) or self.keepalive_seconds <= 0:
            return
        stop = self._keepalive = threading.Event()

        def touch() -> None:
            while not stop.wait(self.keepalive_seconds):
                try:
                    os.utime(path)
                except OSError:
                    return  # renamed into place or discarded meanwhile

        threading.Thread(target=touch, name="sdxlpipe-writer-keepalive", daemon=True).start()

    def _flush(self) -> None:
        builder, self._builder = self._builder, None
        self._stop_keepalive()
        self._done = set()
        if builder is not None and builder.members:
            self.shard_ids.append(commit(self._store, self.stage, builder, self.group))
        elif builder is not None:
            builder.discard()

    def close(self) -> None:
        """Write the shard in progress; a writer that got no items writes nothing."""
        self.end_item()
        self._flush()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
            return False
        # Keep what was finished before the error, so a rerun resumes instead of redoing it;
        # the item in progress may lack fields, so it is dropped and recomputed.
        if self._pending:
            log.warning("store %s: dropping item %s of stage %s, unfinished when %s stopped the writer",
                        self._store.url, self._key, self.stage, exc_type.__name__)
        self._pending, self._key = [], None
        try:
            self._flush()
        except Exception:
            log.exception("store %s: could not save the items of stage %s added before the error",
                          self._store.url, self.stage)
        return False
