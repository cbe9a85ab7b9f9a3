"""Several stores read as one, layer by layer: what training reads a config with dataset sources through.

Items are named by their content, so the same key means the same bytes in
every store, and a key found in an earlier layer is never looked up in a
later one: a run whose published datasets (read-only layers, pinned to their
snapshots) hold every item never lists the config's own store. Each shard's
store is remembered when an item is located in it (`home`), so a reader opens
it there: a local file, or through that store's shard cache.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from .grammar import Location
from .store import Store


class Layers:
    """Stores read first to last; the read API of `Store` that training uses."""

    def __init__(self, stores: list[Store]):
        self.stores = stores
        self.url = " + ".join(s.url for s in stores)
        self._home: dict[tuple[str, str], Store] = {}

    def __repr__(self) -> str:
        return f"Layers({self.url!r})"

    def missing(self, stage: str, keys: Iterable[str]) -> list[str]:
        """The keys no layer has, in their order, each once."""
        left = list(dict.fromkeys(keys))
        for store in self.stores:
            if not left:
                break
            left = store.missing(stage, left)
        return left

    def locate(self, stage: str, keys: Iterable[str], field: str | None = None) -> list[Location | None]:
        """The first good location of each key in the first layer that has one (None when none does)."""
        keys = list(keys)
        out: list[Location | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for store in self.stores:
            if not todo:
                break
            for i, loc in zip(todo, store.locate(stage, [keys[i] for i in todo], field)):
                if loc is not None:
                    out[i] = loc
                    self._home[(stage, loc.shard_id)] = store
            todo = [i for i in todo if out[i] is None]
        return out

    def home(self, stage: str, shard_id: str) -> Store:
        """The store a located shard is read from."""
        return self._home.get((stage, shard_id), self.stores[-1])

    def shard_path(self, stage: str, shard_id: str) -> str:
        return self.home(stage, shard_id).shard_path(stage, shard_id)

    def read(self, stage: str, item_key: str, field: str | None = None) -> bytes | None:
        """The checked payload from the first layer with an intact copy (each marks its bad copies)."""
        for store in self.stores:
            data = store.read(stage, item_key, field)
            if data is not None:
                return data
        return None

    def read_many(self, stage: str, keys: Iterable[str], field: str | None = None) -> Iterator[tuple[str, bytes | None]]:
        left = list(dict.fromkeys(keys))
        for store in self.stores:
            if not left:
                return
            absent = []
            for key, data in store.read_many(stage, left, field):
                if data is None:
                    absent.append(key)
                else:
                    yield key, data
            left = absent
        for key in left:
            yield key, None

    def damaged(self, stage: str, keys: Iterable[str]) -> list[str]:
        """Keys some layer knows whose every copy in every layer is known bad."""
        keys = list(dict.fromkeys(keys))
        lost = set(self.missing(stage, keys))
        known_bad = set()
        for store in self.stores:
            if lost:
                known_bad |= set(store.damaged(stage, [k for k in keys if k in lost]))
        return [k for k in keys if k in lost and k in known_bad]
