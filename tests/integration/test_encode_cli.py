"""Whole `sdxlpipe run encode` processes sharing one store: concurrency, kills, pulls, damage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import cli, cli_json
from tests.encode_data import copy_dataset, make_dataset, tar_members

pytestmark = pytest.mark.slow

STAGES = ("vae_encode", "text_encode")


def computed(report):
    return {s: report["stages"][s]["computed"] for s in STAGES}


# Runs `sdxlpipe run encode` on a slow store: each fsync of shards/vae_encode (a chunk's tar
# entering the store) takes 50 ms more, and the first waits until every run has one ready,
# so the runs' encodes overlap (they load models at different speeds on a loaded machine).
START_TOGETHER = r"""
import os, sys, time
from pathlib import Path
real, meet, runs, first = os.fsync, Path(sys.argv[1]), int(sys.argv[2]), [True]
def fsync(fd):
    real(fd)
    if os.readlink(f"/proc/self/fd/{fd}").endswith("/shards/vae_encode"):
        time.sleep(0.05)
        if first[0]:
            first[0] = False
            (meet / str(os.getpid())).touch()
            deadline = time.monotonic() + 120
            while len(list(meet.iterdir())) < runs and time.monotonic() < deadline:
                time.sleep(0.02)
os.fsync = fsync
sys.argv = ["sdxlpipe", *sys.argv[3:]]
from sdxlpipe.cli import main
main()
"""


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to name fsynced folders")
def test_two_processes_encoding_into_one_store_at_once_split_the_work_and_hold_each_item_once(tmp_path):
    store, meet = tmp_path / "store", tmp_path / "meet"
    meet.mkdir()
    a = make_dataset(tmp_path / "a", 24, store=str(store))
    b = copy_dataset(tmp_path / "a", tmp_path / "b")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", START_TOGETHER, str(meet), "2", "run", "encode", "-c", str(c),
                               "--set", "vae_encode.images_per_shard=1", "--json"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in (a, b)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    reports = [json.loads(out) for out, _ in outs]
    assert cli("store", "verify", "--store", str(store)).stdout.strip() == "store is clean"
    want = {"vae_encode": 24, "text_encode": 6}
    for stage, n in want.items():
        # Identical chunks land under one shard name, so the members cannot show duplicated work.
        members = Counter(tar_members(store, stage))
        assert len(members) == n and max(members.values()) == 1, f"{stage}: an item is stored twice"
        assert [r["stages"][stage]["items"] for r in reports] == [n, n]
        # `computed` is what a run stored (what another committed first counts as reused). The index
        # holds a row per item and commit, except that two identical commits of one chunk may share
        # a fragment (fragments are named by content): between n and the sum.
        stored = [r["stages"][stage]["computed"] for r in reports]
        assert n <= len(_index_rows(store, stage)) <= sum(stored), (stage, stored)
        assert [r["stages"][stage]["reused"] for r in reports] == [n - c for c in stored], (stage, stored)
    # Decision 7: the runs split the 24 single-image chunks; each re-reads the index before a
    # chunk and walks them in an order of its own. Duplicates come from chunks both started
    # before either committed (mostly the last few): at most half of them here. How the 24 fall between
    # the two depends on the scheduler (on a loaded 2-core box one run got 19, the other 14), so the
    # split is asserted as each run storing less than all, not as a balance.
    split = [r["stages"]["vae_encode"]["computed"] for r in reports]
    assert max(split) < 24 and sum(split) <= 36, split
    # text_encode's 6 texts are one chunk: one run or both encode it, never a part.
    assert sorted(r["stages"]["text_encode"]["computed"] for r in reports) in ([0, 6], [6, 6]), reports
    # Afterwards each side finds everything in the store.
    for c in (a, b):
        assert computed(cli_json("run", "encode", "-c", str(c))) == dict.fromkeys(STAGES, 0)


def _index_rows(store: Path, stage: str) -> list[tuple[str, str]]:
    from sdxlpipe.cache_format import open_store

    return [(loc.item_key, loc.shard_id) for loc in open_store(str(store))._index(stage).rows]


# Runs `sdxlpipe run encode` and SIGKILLs it right after the Nth rename into shards/vae_encode
# (the folder is fsynced after each): the 3rd is the second shard's tar, before its
# manifest and its index fragment, the window where a crash could leave a half-committed item.
KILL_AFTER_RENAME = r"""
import os, signal, sys
real, seen, kill_at = os.fsync, [0], int(sys.argv[1])
def fsync(fd):
    real(fd)
    if os.readlink(f"/proc/self/fd/{fd}").endswith("/shards/vae_encode"):
        seen[0] += 1
        if seen[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
os.fsync = fsync
sys.argv = ["sdxlpipe", *sys.argv[2:]]
from sdxlpipe.cli import main
main()
"""


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to name fsynced folders")
def test_a_run_killed_between_a_shard_and_its_fragment_leaves_no_partial_item_and_the_rerun_ends_equal(tmp_path):
    config = make_dataset(tmp_path, 24)
    settings = ["--set", "vae_encode.images_per_shard=2", "--set", "vae_encode.batch_size=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_RENAME, "3", "run", "encode", "-c", str(config),
                           *settings], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    root = tmp_path / ".sdxlpipe" / "store"
    shards = root / "shards" / "vae_encode"
    assert len(list(shards.glob("*.tar"))) == 2 and len(list(shards.glob("*.json"))) == 1
    assert len(list((root / "index" / "vae_encode").glob("*.parquet"))) == 1  # one shard committed
    assert cli("store", "verify", "--store", str(root)).returncode == 0
    from sdxlpipe.cache_format import open_store

    kept = open_store(str(root)).present("vae_encode")

    report = cli_json("run", "encode", "-c", str(config), *settings)

    assert kept and report["stages"]["vae_encode"]["computed"] == 24 - len(kept)  # committed is kept
    assert cli("store", "verify", "--store", str(root)).returncode == 0
    assert len(tar_members(root, "vae_encode")) == 24
    # The killed run's uncommitted tar had the bytes the rerun made for that chunk: no tar is
    # left over beside the indexed ones.
    indexed = {loc.shard_id for loc in open_store(str(root))._index("vae_encode").rows}
    assert {t.stem for t in shards.glob("*.tar")} == indexed


def test_a_pulled_store_serves_a_moved_dataset_without_encoding(tmp_path):
    first = make_dataset(tmp_path / "a", 8)
    assert computed(cli_json("run", "encode", "-c", str(first))) == {"vae_encode": 8, "text_encode": 6}
    pulled = tmp_path / "elsewhere" / "store"
    copied = cli_json("store", "pull", str(tmp_path / "a" / ".sdxlpipe" / "store"), f"file://{pulled}")
    assert copied["vae_encode"]["items"] == 8
    moved = copy_dataset(tmp_path / "a", tmp_path / "elsewhere" / "data")
    moved.write_text(moved.read_text() + f'\n[store]\nurl = "{pulled}"\n')
    assert computed(cli_json("run", "encode", "-c", str(moved))) == dict.fromkeys(STAGES, 0)
    assert cli("store", "verify", "--store", str(pulled)).returncode == 0


def test_damage_found_by_training_is_recomputed_and_the_run_finishes(tmp_path):
    config = make_dataset(tmp_path, 8, extra="\n[train]\nmax_steps = 2\nbatch_size = 2\nrank = 2\nalpha = 4.0\n")
    cli("run", "encode", "-c", str(config))
    from sdxlpipe.cache_format import open_store

    store = open_store(str(tmp_path / ".sdxlpipe" / "store"))
    victim = sorted(store._index("vae_encode").rows)[0]
    tar = tmp_path / ".sdxlpipe" / "store" / "shards" / "vae_encode" / f"{victim.shard_id}.tar"
    data = bytearray(tar.read_bytes())
    data[victim.offset + 200] ^= 0xFF
    tar.write_bytes(bytes(data))
    proc = cli("run", "train", "-c", str(config), "--json")
    import json

    report = json.loads(proc.stdout)
    assert report["damaged"] == {"vae_encode": [victim.item_key]}
    assert report["stages"]["vae_encode"]["computed"] == 1
    assert report["stages"]["train"]["computed"] == 1
    assert victim.item_key in proc.stderr  # the run says which item
