"""Item keys: xxh3-128 of the canonical JSON of everything that shapes an item.

A key document never holds a path, a timestamp, a learning rate that does not
shape the item, or an output directory (DESIGN §3). The document itself is
kept beside the key where a stage wants `status` to explain a change.
"""

from __future__ import annotations

from typing import Any

import xxhash

from sdxlpipe.cache_format.codec import canonical_json


def xxh3_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return xxhash.xxh3_128_hexdigest(data)


def item_key(doc: dict[str, Any]) -> str:
    return xxh3_hex(canonical_json(doc))


def partition_of(key: str, count: int) -> int:
    """Which of `count` partitions an item key falls in (for `--shards K/N`).

    Keys are uniform hex, so the top 64 bits split evenly.
    """
    return int(key[:16], 16) % count
