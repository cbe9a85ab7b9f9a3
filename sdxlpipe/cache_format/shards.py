"""Shard files: the tar builder, manifests, atomic placement, hashing.

Owns every write of a file's bytes into the store (temp name, fsync,
rename; see README.md for the guarantee on each backend), the one local
atomic write (`write_atomic`, which the workspace and exports use too), the one
streaming hasher (`hash_stream`) and the layout of
one shard: a plain ustar/pax tar whose members are `<item_key>.<field>`,
written with fixed owner, mode and mtime so equal items give equal bytes.
Also home of StoreError, which every module of the package raises.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import secrets
import tarfile
import tempfile
import time
from typing import BinaryIO, Callable, Iterable

import xxhash
from fsspec.implementations.local import LocalFileSystem

MANIFEST_FORMAT = 1
# 256 MiB: a shard streams at full disk/network speed and a million latents make a few
# thousand files; lower it if losing one shard to corruption must cost less recomputation.
SHARD_BYTES = 256 << 20
# 8 MiB reads: large enough to run at disk/network speed, small enough to not matter for memory.
HASH_CHUNK = 8 << 20


class StoreError(Exception):
    """A problem with the store: `what` names the object and place, `hint` the fix."""

    def __init__(self, what: str, hint: str = ""):
        super().__init__(what, hint)
        self.what = what
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.what}\nHint: {self.hint}" if self.hint else self.what


def retry_io(attempt: Callable, delays: Iterable[float], what: str, hint: str):
    """attempt() again after an I/O error, waiting each of `delays` seconds in turn; then a StoreError
    naming `what` with `hint`. The one retry rule of the store package (reads, downloads).

    FileNotFoundError is not retried: a file that is gone is damage or absence, not a blip.
    """
    delays = tuple(delays)
    for delay in (*delays, None):
        try:
            return attempt()
        except FileNotFoundError:
            raise
        except Exception as e:
            if not transient(e):
                if type(e).__module__.startswith("aiohttp"):  # an HTTP answer such as 403: say which file
                    raise StoreError(f"could not read {what}: {type(e).__name__}: {e}", hint) from e
                raise
            if delay is None:
                raise StoreError(f"could not read {what}: {type(e).__name__}: {e} ({len(delays) + 1} attempts)",
                                 hint) from e
            logging.getLogger(__name__).warning("reading %s failed (%s); retrying in %.1f s", what, e, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def transient(error: BaseException) -> bool:
    """An error another attempt may not meet: any OSError but a missing file, and an HTTP client's
    dropped connection, broken body, timeout or 5xx/429 answer. fsspec's HTTP filesystem raises
    aiohttp's own errors for those (`_raise_not_found_for_status` -> `raise_for_status`), which are
    not OSErrors; a 4xx answer (forbidden, bad request) is not transient and passes unchanged."""
    if isinstance(error, FileNotFoundError):
        return False
    if isinstance(error, OSError):
        return True
    if not type(error).__module__.startswith("aiohttp"):
        return False
    status = getattr(error, "status", None)  # only ClientResponseError (and its kind) carries one
    return status is None or status >= 500 or status == 429


class CacheDamaged(StoreError):
    """A reader found cached items unusable (checksum, truncation, lost shard).

    `items` maps a stage to the item keys; the store has already marked them bad,
    so the pipeline runner recomputes them and runs the reading stage again.
    """

    def __init__(self, items: dict[str, Iterable[str]], what: str = ""):
        self.items = {stage: sorted(set(keys)) for stage, keys in items.items()}
        count = sum(len(k) for k in self.items.values())
        super().__init__(what or f"{count} cached item(s) are damaged: {self.items}",
                         "run the same command again: the encode stages recompute the damaged items first")


def is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def check_item_name(item_key: str, field: str) -> str:
    """The tar member name of one item field; refuses names webdataset would split wrongly."""
    # webdataset splits a member name at the first dot after the last slash.
    if not item_key or any(c in item_key for c in "./\\\0") or item_key.strip() != item_key:
        raise StoreError(
            f"item key {item_key!r} cannot name a tar member",
            "item keys must be non-empty and free of '.', '/', '\\' and spaces at the ends "
            "(sdxlpipe keys are xxh3 hex strings)",
        )
    if not field or field.startswith(".") or any(c in field for c in "/\\\0"):
        raise StoreError(
            f"field {field!r} of item {item_key} cannot name a tar member",
            "fields are extensions such as 'latent.safetensors' or 'json': no '/', no leading '.'",
        )
    return f"{item_key}.{field}"


def bad_member_names(path: str) -> list[str]:
    """The members of a local tar that are not plain `<item_key>.<field>` files (a path,
    `..`, a link, a device...), or why it is no tar at all: a shard from elsewhere is
    untrusted, and a tool that extracts it must not write outside its folder."""
    bad = []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, _, field = member.name.partition(".")
                try:
                    check_item_name(key, field)
                except StoreError:
                    bad.append(member.name)
                    continue
                if not member.isreg():
                    bad.append(member.name)
    except (tarfile.TarError, ValueError) as e:
        return [f"(not a readable tar: {e})"]
    return bad


def check_stage(stage: str) -> str:
    if not stage or not all(c.isalnum() or c in "_-" for c in stage):
        raise StoreError(
            f"stage name {stage!r} cannot name a store directory",
            "use letters, digits, '_' and '-' only",
        )
    return stage


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def member_bytes(payload_len: int) -> int:
    """Upper bound of what one member adds to a tar: header, pax header for long names, data."""
    return 3 * tarfile.BLOCKSIZE + _padded(payload_len)


class _HashingWriter:
    """Passes writes through to a file and hashes them, so a tar is hashed as it is written."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.hash = xxhash.xxh3_128()
        self.pos = 0

    def write(self, data) -> int:
        self._f.write(data)
        self.hash.update(data)
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos


class ShardBuilder:
    """One tar shard being written to a local temp file.

    `tmp_dir` is inside the store for local stores (so the final rename stays
    on one filesystem) and None (the system temp dir) for remote ones.
    """

    def __init__(self, tmp_dir: str | None):
        if tmp_dir is not None:
            os.makedirs(tmp_dir, exist_ok=True)
        fd, self.path = tempfile.mkstemp(prefix="shard-", suffix=".tar.part", dir=tmp_dir)
        _readable_by_all(fd)
        self._file = os.fdopen(fd, "wb")
        self._hashing = _HashingWriter(self._file)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.PAX_FORMAT)
        self.members: list[dict] = []

    @property
    def size(self) -> int:
        return self._tar.offset

    def add(self, name: str, payload: bytes) -> dict:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
        self._tar.addfile(info, io.BytesIO(payload))
        member = {
            "name": name,
            "offset": self._tar.offset - _padded(len(payload)),
            "length": len(payload),
            "xxh3": xxhash.xxh3_128_hexdigest(payload),
        }
        self.members.append(member)
        return member

    def finish(self) -> tuple[str, int]:
        """Close the tar and fsync it; returns (xxh3 of the tar, size in bytes)."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._hashing.hash.hexdigest(), self._hashing.pos

    def discard(self) -> None:
        try:
            self._file.close()
        finally:
            if os.path.exists(self.path):
                os.remove(self.path)


def manifest(stage: str, shard_id: str, nbytes: int, members: list[dict]) -> dict:
    items = len({m["name"].split(".", 1)[0] for m in members})
    return {
        "format": MANIFEST_FORMAT,
        "stage": stage,
        "items": items,
        "bytes": nbytes,
        "xxh3": shard_id,
        "members": members,
    }


def manifest_problem(doc, stage: str, shard_id: str) -> str | None:
    """What keeps `doc` from being shard `shard_id`'s manifest as README.md ("Manifest") has it,
    or None. Other keys are allowed: a later writer may add some."""
    if not isinstance(doc, dict):
        return f"is a JSON {type(doc).__name__}, not an object"
    lacking = [k for k in ("format", "stage", "items", "bytes", "xxh3", "members") if k not in doc]
    if lacking:
        return f"lacks {lacking}"
    if doc["format"] != MANIFEST_FORMAT or isinstance(doc["format"], bool):
        return f"has format {doc['format']!r}, not {MANIFEST_FORMAT}"
    if doc["stage"] != stage:
        return f"names stage {doc['stage']!r}, not {stage!r}"
    if doc["xxh3"] != shard_id:
        return f"says xxh3 {doc['xxh3']!r}, not the shard's name"
    counts = [doc["items"], doc["bytes"]]
    if not isinstance(doc["members"], list):
        return "has members that are not a list"
    for m in doc["members"]:
        if not isinstance(m, dict) or not {"name", "offset", "length", "xxh3"} <= m.keys():
            return f"has a member that is not {{name, offset, length, xxh3}}: {str(m)[:80]}"
        if not isinstance(m["name"], str) or not isinstance(m["xxh3"], str):
            return f"has a member whose name or xxh3 is not text: {str(m)[:80]}"
        counts += [m["offset"], m["length"]]
    if not all(type(n) is int and n >= 0 for n in counts):
        return "has an items, bytes, offset or length that is not a non-negative integer"
    return None


def _readable_by_all(fd: int) -> None:
    # mkstemp makes 0600 files; a store is often shared between users and machines.
    if os.name == "posix":
        os.fchmod(fd, 0o644)


def _fsync_dir(path: str) -> None:
    # A rename is durable only once its directory is; Windows cannot open directories.
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_durably(src: str, dest: str) -> None:
    """os.replace a file or directory, then fsync the directory that holds it: only then
    does the new name survive a power cut."""
    parent = os.path.dirname(dest) or "."
    os.makedirs(parent, exist_ok=True)
    os.replace(src, dest)
    _fsync_dir(parent)


def default_mode() -> int:
    """The mode a plain open() gives a new file under the current umask (0644 under 022):
    for files people share (exports, configs), where mkstemp's 0600 would lock others out."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path, data: bytes | Callable[[BinaryIO], object], *, mode: int | None = None,
                 tmp_dir: str | None = None) -> None:
    """Write a local file whole or not at all, durably: temp file, fsync, rename, fsync the directory.

    `data`: the bytes, or a function that writes them into the open file (a parquet table,
    without holding its bytes twice). `mode`: permission bits; None keeps mkstemp's 0600.
    `tmp_dir`: where the temp file goes (same filesystem as `path`); None: beside `path`,
    hidden. Every durable local write of sdxlpipe goes through here.
    """
    path = os.fspath(path)
    parent = os.path.dirname(path) or "."
    os.makedirs(tmp_dir or parent, exist_ok=True)
    name = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or parent, prefix=f".{name}." if tmp_dir is None else "part-",
                               suffix=".tmp")
    try:
        if mode is not None and os.name == "posix":
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        rename_durably(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# Object stores whose PUT makes an object appear whole or not at all (multipart uploads
# too): a file is written straight to its final name, no upload to tmp/ and server-side copy.
ATOMIC_PUT_PROTOCOLS = {"s3", "s3a", "gs", "gcs"}


def atomic_put(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool(set(protocols) & ATOMIC_PUT_PROTOCOLS)


def place_file(fs, local_path: str, dest: str, remote_tmp_dir: str) -> None:
    """Move a finished local file to `dest` in one step, as readers must never see half of it."""
    if is_local(fs):
        rename_durably(local_path, dest)
        return
    if atomic_put(fs):
        try:
            fs.put_file(local_path, dest)
        finally:
            os.remove(local_path)
        return
    tmp = posixpath.join(remote_tmp_dir, secrets.token_hex(8))
    try:
        fs.put_file(local_path, tmp)
        fs.mv(tmp, dest)
    finally:
        os.remove(local_path)
        if fs.exists(tmp):
            fs.rm(tmp)


def write_bytes(fs, dest: str, data: bytes, tmp_dir: str) -> None:
    """Write a small file (FORMAT, manifest, index fragment): temp name, fsync, rename."""
    if is_local(fs):
        write_atomic(dest, data, mode=0o644, tmp_dir=tmp_dir)  # 0644: a store is shared between users
        return
    if atomic_put(fs):
        fs.pipe_file(dest, data)
        return
    tmp = posixpath.join(tmp_dir, secrets.token_hex(8))
    try:
        fs.pipe_file(tmp, data)
        fs.mv(tmp, dest)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def hash_file(path) -> str:
    """xxh3_128 hex of a local file's bytes, read in HASH_CHUNK pieces."""
    with open(path, "rb") as f:
        return hash_stream(f)[0]


def hash_stream(f: BinaryIO, copy_to: BinaryIO | None = None) -> tuple[str, int]:
    """xxh3_128 hex of everything left in `f`, and its length; `copy_to` gets the same bytes
    (a shard downloaded and hashed in one pass). sdxlpipe's one streaming hasher."""
    h = xxhash.xxh3_128()
    n = 0
    while chunk := f.read(HASH_CHUNK):
        h.update(chunk)
        if copy_to is not None:
            copy_to.write(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def read_range(f: BinaryIO, offset: int, length: int) -> bytes:
    f.seek(offset)
    return f.read(length)


def is_http(fs) -> bool:
    """A store served by a plain web server (fsspec's HTTP filesystem): read-only, never listed."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool({"http", "https"} & set(protocols))


def fetch_range(fs, path: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a remote file by one ranged GET.

    A server without range support (Python's `http.server`, some CDNs) answers the whole
    file: the range is then cut out of it, never taken for the range itself (that would
    read as a checksum mismatch, i.e. as damage). A short answer stays short (truncation).
    """
    data = fs.cat_file(path, start=start, end=end)
    if len(data) > end - start:
        return data[start:end]
    return data


class RangeReader:
    """seek/read over a remote file, each read one ranged GET (`fetch_range`); for HTTP stores,
    whose fsspec file object refuses reads past the start on servers without ranges."""

    def __init__(self, fs, path: str):
        self.fs, self.path, self.pos = fs, path, 0

    def seek(self, offset: int) -> None:
        self.pos = offset

    def read(self, length: int) -> bytes:
        data = fetch_range(self.fs, self.path, self.pos, self.pos + length)
        self.pos += len(data)
        return data

    def close(self) -> None:
        pass


def open_for_ranges(fs, path: str):
    """A file to read items from by offset: fsspec's own, or a `RangeReader` over HTTP."""
    return RangeReader(fs, path) if is_http(fs) else fs.open(path, "rb")


def open_stream(fs, path: str):
    """A file to read whole, from the start: over HTTP a streaming GET (no ranges needed)."""
    return fs.open(path, "rb", block_size=0) if is_http(fs) else fs.open(path, "rb")


def check_payload(f: BinaryIO, loc) -> tuple[bytes | None, str | None]:
    """The payload at an index row `loc` (offset, length, xxh3) of the open shard `f`, or None
    and what is wrong with it. I/O errors propagate: they are not damage."""
    if loc.offset < 0 or loc.length < 0:
        return None, f"index row gives offset {loc.offset}, length {loc.length}"
    data = read_range(f, loc.offset, loc.length)
    if len(data) != loc.length:
        return None, f"truncated: {len(data)} of {loc.length} bytes"
    if xxhash.xxh3_128_hexdigest(data) != loc.xxh3:
        return None, "checksum mismatch"
    return data, None
