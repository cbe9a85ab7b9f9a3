"""Whole `sdxlpipe run encode` processes sharing one store: concurrency, kills, pulls, damage."""

from __future__ import annotations

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


def popen(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "sdxlpipe", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_encoding_into_one_store_at_once_hold_each_item_once(tmp_path):
    store = tmp_path / "store"
    small_shards = "vae_encode.images_per_shard=3"
    a = make_dataset(tmp_path / "a", 24, store=str(store))
    b = copy_dataset(tmp_path / "a", tmp_path / "b")
    procs = [popen("run", "encode", "-c", str(c), "--set", small_shards, "--json") for c in (a, b)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert cli("store", "verify", "--store", str(store)).stdout.strip() == "store is clean"
    for stage in STAGES:
        members = Counter(tar_members(store, stage))
        assert members and max(members.values()) == 1, f"{stage}: an item is stored twice"
    want = {"vae_encode": 24, "text_encode": 6}
    for stage, n in want.items():
        assert len(tar_members(store, stage)) == n
    # Afterwards each side finds everything in the store.
    for c in (a, b):
        assert computed(cli_json("run", "encode", "-c", str(c))) == dict.fromkeys(STAGES, 0)


def test_a_run_killed_while_writing_leaves_no_partial_item_and_the_next_run_finishes(tmp_path):
    config = make_dataset(tmp_path, 24)
    settings = ["--set", "vae_encode.images_per_shard=2", "--set", "vae_encode.batch_size=2"]
    proc = popen("run", "encode", "-c", str(config), *settings)
    index = tmp_path / ".sdxlpipe" / "store" / "index" / "vae_encode"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(index.glob("*.parquet"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(list(index.glob("*.parquet")))
    assert 2 <= committed < 12, "the run was not killed in the middle"
    store = str(tmp_path / ".sdxlpipe" / "store")
    assert cli("store", "verify", "--store", store).returncode == 0
    report = cli_json("run", "encode", "-c", str(config), *settings)
    done_before = 24 - report["stages"]["vae_encode"]["computed"]
    assert done_before >= 2 * committed - 2 and report["stages"]["vae_encode"]["computed"] > 0
    assert cli("store", "verify", "--store", store).returncode == 0
    assert len(tar_members(Path(store), "vae_encode")) == 24


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
