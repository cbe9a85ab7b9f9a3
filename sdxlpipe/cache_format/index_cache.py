"""The local index cache: a stage's decoded index columns in one file, outside the store.

Derived data, not part of the store format (README.md, "What a reader may
cache"). A `StageIndex` seeds itself from this file instead of parsing every
fragment, then lists the store once as always: fragments the file does not
cover are read from the store, fragments it covers that are no longer listed
(compacted away) drop their rows, and a covered fragment whose listed size or
time differs makes the whole file unusable. The file never answers alone.

One file per (store, stage): `<dir>/<xxh3 of the store's address>/<stage>.idx`,
where <dir> is $SDXLPIPE_INDEX_CACHE, else $XDG_CACHE_HOME/sdxlpipe/index
(~/.cache/sdxlpipe/index); SDXLPIPE_INDEX_CACHE=off turns it off. Layout:

    MAGIC, 8-byte little-endian header length, JSON header, zero padding to
    64 bytes, body (the columns one after another, each 64-aligned), and the
    body's xxh3-128 digest (16 bytes)

The header names the store and stage, the covered fragments with their listing
signatures (in frag-code order; null for a name no row uses), the shard / field
/ group names the codes index, the row count, and each column's dtype and body
offset. Rows are in the order of their key's top 64 bits (so a load needs no
sort). Anything that does not check out (magic, header, checksum, shapes, code
ranges, names outside the grammar) makes `load` return None: rebuild from the
store. Writes are temp file + rename without fsync: a torn file fails its
checksum and is rebuilt, which is cheaper than an fsync of ~100 MB per save.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import xxhash

MAGIC = b"sdxlpipe-index-cache 1\n"
ENV = "SDXLPIPE_INDEX_CACHE"
OFF = {"off", "0", "no", "false", "none"}
# Filesystems whose stores live in this process only: a file on disk would describe another store.
PROCESS_LOCAL = {"memory"}
ALIGN = 64  # column offsets in the file: numpy views of any dtype start aligned (cache lines too)
DIGEST = 16  # bytes of the xxh3-128 of the body that ends the file
# (column, dtype): what a StageIndex segment holds, minus `bad` (markers are always read).
COLUMNS = (("key", "S32"), ("xxh3", "S32"), ("offset", "<i8"), ("length", "<i8"),
           ("shard", "<i4"), ("field", "<i4"), ("group", "<i4"), ("frag", "<i4"))
# Store options that say which server a URL points at (an S3 endpoint, a GCS project): part of
# the store's identity, so two servers' `s3://bucket` never share a file. Never credentials.
IDENTITY_OPTIONS = ("endpoint_url", "project", "host", "port")


def directory() -> str | None:
    """Where index caches live, or None when turned off (SDXLPIPE_INDEX_CACHE=off)."""
    chosen = os.environ.get(ENV, "")
    if chosen.strip().lower() in OFF:
        return None
    if chosen:
        return chosen
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sdxlpipe", "index")


def path_for(fs, store_url: str, stage: str) -> str | None:
    """The cache file of one stage of a store, or None (turned off, or a process-local store)."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    where = directory()
    if where is None or set(protocols) & PROCESS_LOCAL:
        return None
    options = dict(getattr(fs, "storage_options", {}) or {})
    options.update(options.pop("client_kwargs", None) or {})
    identity = {"store": store_url, **{k: str(options[k]) for k in IDENTITY_OPTIONS if k in options}}
    digest = xxhash.xxh3_128_hexdigest(json.dumps(identity, sort_keys=True).encode())
    return os.path.join(where, digest, f"{stage}.idx")


def save(path: str, header: dict, column, n: int) -> None:
    """Write the header and `n` rows: column(name) gives one column in key order, asked for
    one at a time, so the peak is one column's copy. Best effort: a cache that cannot be
    written (read-only home, full disk) only means the next load parses."""
    layout, offset = {}, 0
    for name, dtype in COLUMNS:
        layout[name] = [np.dtype(dtype).str, offset]
        offset += _aligned(n * np.dtype(dtype).itemsize)
    head = json.dumps({**header, "rows": n, "columns": layout}, sort_keys=True, separators=(",", ":")).encode()
    prefix = MAGIC + len(head).to_bytes(8, "little") + head
    prefix += bytes(_aligned(len(prefix)) - len(prefix))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".idx-", suffix=".tmp")
    except OSError:
        return
    try:
        digest = xxhash.xxh3_128()
        with os.fdopen(fd, "wb") as f:
            f.write(prefix)
            for name, dtype in COLUMNS:
                arr = np.ascontiguousarray(column(name), dtype=dtype)
                for chunk in (memoryview(arr).cast("B"), bytes(_aligned(arr.nbytes) - arr.nbytes)):
                    digest.update(chunk)
                    f.write(chunk)
                del arr
            f.write(digest.digest())  # the body's xxh3-128, last: a torn write fails it
        os.replace(tmp, path)
    except OSError:
        pass  # derived data: the next load reads the store
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path: str, store_url: str, stage: str) -> tuple[dict, dict[str, np.ndarray]] | None:
    """(header, columns) of a cache file that checks out, else None. Columns are read-only
    views of one read of the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        return _decode(data, store_url, stage)
    except (ValueError, KeyError, TypeError, IndexError, OverflowError):
        return None


def _decode(data: bytes, store_url: str, stage: str) -> tuple[dict, dict[str, np.ndarray]] | None:
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8 + DIGEST:
        return None
    size = int.from_bytes(data[len(MAGIC):len(MAGIC) + 8], "little")
    head_end = len(MAGIC) + 8 + size
    header = json.loads(data[len(MAGIC) + 8:head_end])
    if header.get("store") != store_url or header.get("stage") != stage:
        return None
    body = memoryview(data)[_aligned(head_end):len(data) - DIGEST]
    if xxhash.xxh3_128_digest(body) != data[len(data) - DIGEST:]:
        return None
    n = int(header["rows"])
    cols = {}
    for name, dtype in COLUMNS:
        stored, offset = header["columns"][name]
        if stored != np.dtype(dtype).str or int(offset) % ALIGN:
            return None
        cols[name] = np.frombuffer(body, np.dtype(dtype), n, int(offset))
    return header, cols


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
