"""A local directory of whole shards copied from a remote store, for training's per-batch reads.

A shard is named by the xxh3 of its bytes (decisions.md 2), so a cached copy
is named by its content, not by the store it came from: two runs on one
machine, or two stores holding the same shard, share one copy. A download is
hashed as it streams in and renamed into place only when the hash matches the
name ("verified once on arrival"); readers still check each item's xxh3.

The directory is kept under a byte limit by evicting the least recently used
shards. "Used" is the file's mtime, touched on every use, so separate
processes (loader workers, ranks, other runs) share one LRU order without a
shared index; a per-shard lock file (removed after the download) makes
processes that want the same shard download it once. A shard not cached yet
can also be read by ranges (`read_range`), so a batch never waits for whole
shards it needs a few items of. An evicted shard that a reader still has open stays
readable (POSIX unlink); one evicted before it was opened is fetched again.
Modelled on MosaicML streaming's `cache_limit` / `predownload`, which keeps
one local directory per dataset instead. Imports no torch.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import threading
from pathlib import Path

import fsspec
import xxhash

from .shards import hash_stream, open_stream, retry_io

log = logging.getLogger("sdxlpipe.shard_cache")
# A failed download (network, throttling) is tried this often, waiting 1, 2, 4 s between tries,
# before the run stops; a missing shard is not retried (it is damage, not a transient error).
DOWNLOAD_DELAYS = (1.0, 2.0, 4.0)
DOWNLOAD_HINT = ("check the network and credentials, then run the same command again: "
                 "training resumes from its last checkpoint")


def default_directory() -> Path:
    """$XDG_CACHE_HOME/sdxlpipe/shards (~/.cache/sdxlpipe/shards): one cache per user and machine."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdxlpipe" / "shards"


class ShardCache:
    """Verified local copies of one remote store's shards, under `limit_bytes` (LRU).

    Picklable and fork-safe: the remote filesystem is opened lazily in each process.
    """

    def __init__(self, url: str, directory: str | Path, limit_bytes: int):
        self.url = url.rstrip("/")
        self.directory = Path(directory)
        self.limit_bytes = int(limit_bytes)
        # Does the server answer range requests? None: not known yet; False: it sent a whole shard
        # for a range, so readers fetch whole shards (`get`) rather than ranges.
        self.ranges: bool | None = None
        # Until `ranges` is known, one range request at a time: readers starting together on a server
        # without ranges would each download a whole shard (measured: 138% of a small store).
        self._probe = threading.Lock()
        self._store = None
        self._pid = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None, "_pid": None, "_probe": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _probe=threading.Lock())

    def _remote(self, stage: str, shard_id: str):
        """The remote filesystem and the shard's path in it, from the store's own layout (`Store.shard_path`,
        which refuses a stage or shard id that is not one before it becomes a path)."""
        from .store import Store

        if self._store is None or self._pid != os.getpid():
            fs, root = fsspec.core.url_to_fs(self.url)
            # Paths only: a Store object does no I/O until asked, and this one is asked for nothing else.
            self._store, self._pid = Store(fs, root.rstrip("/") or "/", self.url, read_only=True), os.getpid()
        return self._store.fs, self._store.shard_path(stage, shard_id)

    def local_path(self, shard_id: str) -> Path:
        return self.directory / f"{shard_id}.tar"

    def peek(self, shard_id: str) -> Path | None:
        """The local copy of a shard if it is cached (and now the most recently used), else None; never fetches."""
        path = self.local_path(shard_id)
        return path if _touch(path) else None

    def read_range(self, stage: str, shard_id: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the remote shard, for reads of a shard that is not cached yet.

        Raises FileNotFoundError when the shard is gone, StoreError when it cannot be read after retries.
        """
        if self.ranges is None:
            with self._probe:
                if self.ranges is None:
                    return self._fetch_range(stage, shard_id, start, end)
        if self.ranges is False:  # the server sends whole files: fetch this one once (locked), read it here
            path = self.get(stage, shard_id)
            if path is not None:
                with open(path, "rb") as f:
                    f.seek(start)
                    return f.read(end - start)
        return self._fetch_range(stage, shard_id, start, end)

    def _fetch_range(self, stage: str, shard_id: str, start: int, end: int) -> bytes:
        fs, remote = self._remote(stage, shard_id)
        data = retry_io(lambda: fs.cat_file(remote, start=start, end=end), DOWNLOAD_DELAYS,
                        f"{remote} from {self.url}", DOWNLOAD_HINT)
        if len(data) <= end - start:
            if len(data) == end - start and self.ranges is None:
                self.ranges = True  # a short answer (a truncated shard) says nothing about ranges
            return data
        # The server ignored the range and sent the whole shard (Python's http.server does): keep it
        # as the cached copy, and fetch whole shards from now on (`ranges`), instead of a whole
        # shard per item. The range is cut out of it, never taken for the range itself.
        self.ranges = False
        self._keep(shard_id, data)
        return data[start:end]

    def _keep(self, shard_id: str, data: bytes) -> None:
        """Cache a whole shard already in memory, if it hashes to its name."""
        if xxhash.xxh3_128_hexdigest(data) != shard_id:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".tmp-{secrets.token_hex(6)}"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self.local_path(shard_id))
        finally:
            tmp.unlink(missing_ok=True)
        self.evict(frozenset({shard_id}))

    def get(self, stage: str, shard_id: str, keep: frozenset[str] = frozenset()) -> Path | None:
        """The local path of a verified copy of the shard, downloading it if needed.

        None when the remote shard does not hash to its name (a damaged shard whose intact
        items are read from the store one by one). Raises FileNotFoundError when the remote
        shard is gone, StoreError when it cannot be fetched after retries. `keep`: shard ids
        eviction must spare (the prefetcher's window).
        """
        self._remote(stage, shard_id)  # a shard id that is not one never names a local file either
        path = self.local_path(shard_id)
        if _touch(path):
            return path
        self.directory.mkdir(parents=True, exist_ok=True)
        with _locked(self.directory / f".{shard_id}.lock"):
            if _touch(path):  # another process fetched it while we waited for the lock
                return path
            if not self._download(stage, shard_id, path):
                return None
        self.evict(keep | {shard_id})
        return path

    def _download(self, stage: str, shard_id: str, path: Path) -> bool:
        fs, remote = self._remote(stage, shard_id)
        tmp = path.with_name(f".tmp-{secrets.token_hex(6)}")

        def attempt() -> bool:
            try:
                with open_stream(fs, remote) as src, open(tmp, "wb") as dst:
                    digest, _ = hash_stream(src, copy_to=dst)
                if digest != shard_id:
                    log.warning("shard %s of %s hashes to %s: not cached; its items are read one by one",
                                shard_id, self.url, digest)
                    return False
                os.replace(tmp, path)
                return True
            finally:
                tmp.unlink(missing_ok=True)

        return retry_io(attempt, DOWNLOAD_DELAYS, f"shard {remote} from {self.url}", DOWNLOAD_HINT)

    def evict(self, keep: frozenset[str] | set[str] = frozenset()) -> int:
        """Delete least recently used shards until the directory is under the limit; returns bytes left."""
        entries = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(".tar") and not entry.name.startswith("."):
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue  # evicted by another process meanwhile
                entries.append((st.st_mtime, st.st_size, entry.name))
        total = sum(size for _, size, _ in entries)
        for _, size, name in sorted(entries):
            if total <= self.limit_bytes:
                break
            if name[: -len(".tar")] in keep:
                continue
            (self.directory / name).unlink(missing_ok=True)
            total -= size
        return total

    def discard(self, shard_id: str) -> None:
        """Forget a cached copy that turned out bad after arrival (e.g. the disk); the next use refetches."""
        self.local_path(shard_id).unlink(missing_ok=True)


def _touch(path: Path) -> bool:
    """Mark a cached shard as just used; False if it is not there."""
    try:
        os.utime(path)
        return True
    except FileNotFoundError:
        return False


class _locked:
    """An exclusive flock on a small lock file, held for one download; the file is removed on release.

    A waiter may wake holding the lock of a file its holder has just removed; it checks that the
    path still names the file it locked, and otherwise locks the new one.
    """

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self.fd = fd
                    return self
            except FileNotFoundError:
                pass
            os.close(fd)

    def __exit__(self, *exc) -> None:
        try:
            os.unlink(self.path)  # before unlocking, so nobody can lock it after we are done
        except FileNotFoundError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
