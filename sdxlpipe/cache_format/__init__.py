"""The on-disk artifact store (format "sdxlpipe-store 1", specified in README.md).

Each module's one line is in docs/architecture.md: codec.py (payload bytes),
shards.py (tar shards, manifests, atomic writes), listing.py (the one
lister), grammar.py (the index rows' schemas and checks), segments.py and
index.py (a stage's index in memory), index_cache.py (its local cache),
store.py (open_store, Store), writer.py (the shard writer), maintenance.py
(verify, gc, compact, du), sync.py (push/pull), shard_cache.py (training's
local copies of remote shards).
Importing this package does not import torch.
"""

from .codec import decode_json, decode_tensors, encode_json, encode_tensors
from .shards import SHARD_BYTES, CacheDamaged, StoreError
from .store import FORMAT_LINE, Store, Writer, open_store

__all__ = [
    "CacheDamaged",
    "FORMAT_LINE",
    "SHARD_BYTES",
    "Store",
    "StoreError",
    "Writer",
    "decode_json",
    "decode_tensors",
    "encode_json",
    "encode_tensors",
    "open_store",
]
