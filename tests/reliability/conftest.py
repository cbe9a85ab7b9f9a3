"""Fault injection at the fsspec layer: a local filesystem whose shard reads or writes fail."""

import errno

import pytest
from fsspec.implementations.local import LocalFileSystem


class FaultyFS(LocalFileSystem):
    """A local filesystem that fails the next `fail_opens` shard opens and `fail_reads` shard
    reads with a connection reset, like an object store having a blip."""

    cachable = False  # each test gets its own instance and counters

    def __init__(self, fail_opens: int = 0, fail_reads: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.fail_opens = fail_opens
        self.fail_reads = fail_reads
        self.shard_opens = 0

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if not str(path).endswith(".tar") or "r" not in mode:
            return f
        self.shard_opens += 1
        if self.fail_opens > 0:
            self.fail_opens -= 1
            f.close()
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer (injected)")
        return _FaultyFile(f, self)


class _FaultyFile:
    def __init__(self, f, fs: FaultyFS):
        self._f, self._fs = f, fs

    def read(self, *args):
        if self._fs.fail_reads > 0:
            self._fs.fail_reads -= 1
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer (injected)")
        return self._f.read(*args)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def payloads():
    """Ten items of distinct, reproducible bytes: key -> payload."""
    return {f"{i:032x}": bytes([i]) * (300 + 97 * i) for i in range(10)}
