"""ENOSPC at any write of a commit: one clear error, no partial item visible, the next run completes.

The fault is injected at fsync, where a full disk shows up on filesystems with delayed
allocation; the commit calls it for the tar, the manifest, the fragment and their folders.
"""

import errno
import os

import pytest

from sdxlpipe.cache_format import StoreError, open_store

FIELDS = ("latent.safetensors", "json")


def _write_all(store, payloads):
    with store.writer("vae", target_shard_bytes=4096) as w:
        for key, payload in payloads.items():
            for field in FIELDS:
                w.add(key, field, payload)


@pytest.mark.parametrize("failing_call", [1, 3, 5, 9])
def test_a_full_disk_mid_commit_is_one_clear_error_and_the_next_run_completes(tmp_path, payloads,
                                                                              monkeypatch, failing_call):
    root = str(tmp_path / "store")
    store = open_store(root)
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == failing_call:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StoreError, match="No space left on device") as raised:
        _write_all(store, payloads)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert "run the same command again" in str(raised.value)

    reader = open_store(root)
    visible = reader.present("vae")
    assert visible < set(payloads)  # it stopped early
    for key in visible:  # whatever is visible is whole
        assert [reader.read("vae", key, f) for f in FIELDS] == [payloads[key]] * 2
    assert reader.verify() == []

    _write_all(open_store(root), {k: v for k, v in payloads.items() if k not in visible})
    reader.refresh()
    assert reader.present("vae") == set(payloads)
    assert reader.verify() == []
    reader.gc(grace_seconds=0)
    assert os.listdir(os.path.join(root, "tmp")) == []
    assert all(reader.read("vae", key, f) == payloads[key] for key in payloads for f in FIELDS)
