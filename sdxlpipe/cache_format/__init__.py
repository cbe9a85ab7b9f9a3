"""The on-disk artifact store (format "sdxlpipe-store 1", specified in README.md).

codec.py: payload bytes (safetensors, canonical JSON). shards.py: tar shards,
manifests and atomic writes. index.py: parquet index fragments and bad
markers. store.py: open_store, Store, the writer and maintenance.
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
