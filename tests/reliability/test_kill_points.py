"""SIGKILL at seeded points of a store commit (between the tar, its manifest and its fragment),
then a rerun: the store verifies clean, holds every item whole, and keeps what was committed."""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sdxlpipe.cache_format import open_store

FIELDS = ("latent.safetensors", "json")
ITEMS = 12

# The child writes ITEMS two-field items in 4 KiB shards and kills itself at its Nth fsync:
# the commit fsyncs the tar, the manifest, the fragment and each folder after its rename.
CHILD = r"""
import os, signal, sys
from sdxlpipe.cache_format import open_store
root, kill_at = sys.argv[1], int(sys.argv[2])
real, calls = os.fsync, [0]
def fsync(fd):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(fd)
os.fsync = fsync
store = open_store(root)
with store.writer("vae", target_shard_bytes=4096) as w:
    for i in range(%d):
        key = f"{i:032x}"
        for field in ("latent.safetensors", "json"):
            w.add(key, field, bytes([i]) * (300 + 97 * i))
""" % ITEMS


def _payload(key: str) -> bytes:
    i = int(key, 16)
    return bytes([i]) * (300 + 97 * i)


# fsyncs of one commit: 1 tar, 2 folder (tar renamed in), 3 manifest, 4 folder, 5 fragment,
# 6 folder; the second shard's are 7-12. One point in each window, the rest seeded.
KILL_POINTS = [2, 3, 11] + random.Random(12).sample([1, 4, 5, 6, 7, 8, 9, 10, 12], 1)


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_a_writer_killed_mid_commit_leaves_a_store_that_verifies_and_a_rerun_completes(tmp_path, kill_at):
    root = str(tmp_path / "store")
    open_store(root)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", CHILD, root, str(kill_at)], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL

    store = open_store(root)
    keys = [f"{i:032x}" for i in range(ITEMS)]
    committed = store.present("vae")
    assert committed < set(keys)
    assert store.verify() == []
    for key in committed:  # visible means whole
        assert [store.read("vae", key, f) for f in FIELDS] == [_payload(key)] * 2
    fragments_before = set(Path(root, "index", "vae").glob("*.parquet"))

    todo = store.missing("vae", keys)
    assert set(todo) == set(keys) - committed  # nothing committed is done again
    with store.writer("vae", target_shard_bytes=4096) as w:
        for key in todo:
            for field in FIELDS:
                w.add(key, field, _payload(key))

    store.refresh()
    assert store.present("vae") == set(keys)
    assert store.verify() == []
    assert all(store.read("vae", k, f) == _payload(k) for k in keys for f in FIELDS)
    assert fragments_before <= set(Path(root, "index", "vae").glob("*.parquet"))
    store.gc(grace_seconds=0)
    assert os.listdir(Path(root, "tmp")) == [] and store.verify() == []


# `sdxlpipe run ARGS...` that SIGKILLs itself at the fsync of a file whose path contains
# argv[1]: every workspace and store write fsyncs its temp file just before the rename.
CLI_CHILD = r"""
import os, signal, sys
real, target = os.fsync, sys.argv[1]
def fsync(fd):
    if target in os.readlink(f"/proc/self/fd/{fd}"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(fd)
os.fsync = fsync
sys.argv = ["sdxlpipe", *sys.argv[2:]]
from sdxlpipe.cli import main
main()
"""


def _ingest_table(config: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows = pq.read_table(config.parent / ".sdxlpipe" / "tables" / "ingest.parquet").to_pylist()
    return sorted(({k: v for k, v in r.items() if k != "source"} for r in rows), key=lambda r: r["key"])


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to name fsynced files")
def test_ingest_killed_while_writing_its_table_then_rerun_ends_with_the_table_of_an_unbroken_run(tmp_path):
    from tests.conftest import cli, copy_example

    unbroken = copy_example(tmp_path / "unbroken")
    cli("run", "ingest", "-c", str(unbroken))
    killed = copy_example(tmp_path / "killed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", CLI_CHILD, ".ingest.parquet.", "run", "ingest", "-c", str(killed)],
                          env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    table = killed.parent / ".sdxlpipe" / "tables" / "ingest.parquet"
    assert not table.exists()  # killed with the table written but not yet renamed into place

    cli("run", "ingest", "-c", str(killed))

    assert _ingest_table(killed) == _ingest_table(unbroken)
