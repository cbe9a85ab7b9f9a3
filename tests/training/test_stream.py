"""Training streams its batches from the store: equal to the in-memory batches, damage handled, remote stores cached.

Given a real store of cached latents and text embeddings (tests/training/conftest.py),
the loader reads each batch by (shard, offset, length) when it is due; these tests
check what it delivers against the old all-in-RAM path, what happens when an item
turns out damaged mid-run, and training from a `memory://` store and from an S3 API
(moto's server on 127.0.0.1, reached through s3fs) through a local shard cache
smaller than the dataset.
"""

from __future__ import annotations

import posixpath
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
import xxhash
import torch
from safetensors.torch import load_file

from sdxlpipe.cache_format import CacheDamaged, open_store
from sdxlpipe.cache_format.shard_cache import ShardCache
from sdxlpipe.pipeline.keys import xxh3_hex
from sdxlpipe.training import stream
from sdxlpipe.training.batches import as_float, pick
from tests.training.reference_batches import assemble, decode_latent, decode_text, load_cached
from sdxlpipe.training.data import BatchPlan
from sdxlpipe.training.feed import open_feed
from tests.training.conftest import build_samples, make_context, params, run_train

# Small shards, so a few samples spread over many of them (a text payload here is ~15 KB).
SHARD_BYTES = 20_000
SAMPLES = dict(n=4, flips=True, variants=1, shard_bytes=SHARD_BYTES)
RUN = dict(max_steps=4, save_every_steps=4, caption_dropout=0.3, loader_workers=2)


def plan_of(table, p) -> BatchPlan:
    rows = table.to_pylist()
    return BatchPlan([(r["bucket_w"], r["bucket_h"]) for r in rows], [r["repeats"] for r in rows],
                     p.batch_size, p.seed, [bool(r.get("is_reg")) for r in rows])


def assert_same_batch(got: dict, want: dict) -> None:
    """`got`, a streamed batch, arrives in the stored dtype; the loop computes in fp32 (`as_float`)."""
    assert set(got) - {"index"} == set(want)
    assert got["mean"].dtype == torch.float16  # the stored dtype: half the bytes to copy
    got = as_float(got)
    for name, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
        else:
            assert got[name] == value, name


def shard_files(store_root: Path, stage: str) -> list[Path]:
    return sorted((store_root / "shards" / stage).glob("*.tar"))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def tensor_byte(store, stage: str, loc) -> int:
    """The offset in its shard of the last byte of an item's tensor data: flipped, the payload still
    parses (only the checksum can tell), unlike a byte of its safetensors header."""
    payload = store.read(stage, loc.item_key)
    header_end = 8 + int.from_bytes(payload[:8], "little")
    assert header_end < loc.length - 1
    return loc.offset + loc.length - 1


def header_byte(store, stage: str, loc) -> int:
    """The offset in its shard of a byte inside an item's safetensors JSON header."""
    payload = store.read(stage, loc.item_key)
    assert 8 < 100 < 8 + int.from_bytes(payload[:8], "little")
    return loc.offset + 100


@pytest.mark.parametrize("text_encoder", [False, True], ids=["cached-text", "train-text-encoder"])
def test_streamed_batches_equal_the_in_memory_batches_in_the_same_order(tmp_path, text_encoder):
    ctx = make_context(tmp_path / "ws")
    table = build_samples(ctx, 7, flips=True, variants=2, masks=True, reg=3, shard_bytes=SHARD_BYTES)
    assert len(shard_files(Path(ctx.store.root), "text_encode")) > 5  # batches really span shards
    p = params(batch_size=2, caption_dropout=0.3, masked_loss=True, gradient_accumulation_steps=2,
               loader_workers=2, train_text_encoder=text_encoder)
    rows, plan = table.to_pylist(), plan_of(table, p)
    latents, texts = load_cached(rows, ctx, texts=not text_encoder)

    def in_memory(index: int, fixed: bool) -> dict:
        epoch, members = plan.batch_at(index)
        return assemble([rows[i] for i in members], members, latents, texts, p, epoch, index, fixed)

    source = stream.open_source(table, ctx.store, p, plan, stages=ctx.config.stages)
    # Rank 1 of 2 processes, resumed at step 1, over three epochs: batches 5, 7, ..., 23.
    with open_feed(source, p, start_step=1, max_steps=6, world=2, rank=1, device="cpu") as feed:
        assert list(feed.indices) == list(range(5, 24, 2))
        for index in feed.indices:
            assert_same_batch(feed.take(index), in_memory(index, False))
    assert plan.batch_at(23)[0] >= 2
    for index in range(4):  # the fixed evaluation batches, read in this process
        assert_same_batch(source.batch(index, fixed=True), in_memory(index, True))


def test_a_damaged_item_is_read_from_its_intact_copy_and_marked_bad(tmp_path):
    ctx = make_context(tmp_path / "ws")
    table = build_samples(ctx, 6, shard_bytes=SHARD_BYTES)
    p = params(loader_workers=2)
    key = xxh3_hex("t2")  # build_samples' keys are xxh3 of names
    payload = ctx.store.read("text_encode", key)
    with ctx.store.writer("text_encode") as w:  # a second copy, in another shard (so other bytes)
        w.add(key, "text.safetensors", payload)
        w.add(xxh3_hex("other"), "text.safetensors", payload)
    ctx.store.refresh()
    victim = ctx.store.locate("text_encode", [key])[0]  # the copy read first
    plan = plan_of(table, p)
    # Batches are located ahead: at the first copy.
    source = stream.open_source(table, ctx.store, p, plan, stages=ctx.config.stages)
    flip_byte(Path(ctx.store.root) / "shards" / "text_encode" / f"{victim.shard_id}.tar",
              tensor_byte(ctx.store, "text_encode", victim))
    rows = table.to_pylist()
    with open_feed(source, p, start_step=0, max_steps=6, world=1, rank=0, device="cpu") as feed:
        for index in feed.indices:
            epoch, members = plan.batch_at(index)
            got = feed.take(index)
            texts = {k: decode_text(ctx.store.read("text_encode", k)) for k in {r["text_key"] for r in rows}}
            latents = {r["latent_key"]: decode_latent(ctx.store.read("vae_encode", r["latent_key"])) for r in rows}
            assert_same_batch(got, assemble([rows[i] for i in members], members, latents, texts, p, epoch, index, False))
    fresh = open_store(ctx.store.root)
    assert fresh.locate("text_encode", [key])[0].shard_id != victim.shard_id  # the bad copy is marked
    assert fresh.damaged("text_encode", [key]) == []  # and the item is still present


@pytest.mark.parametrize("damage", ["header byte", "tensor byte", "vanished shard"])
def test_a_damaged_item_without_a_copy_stops_the_run_naming_it_and_the_repair(tmp_path, damage):
    ctx = make_context(tmp_path / "ws")
    table = build_samples(ctx, 6, shard_bytes=SHARD_BYTES)
    p = params(loader_workers=2)
    key = xxh3_hex("t4")
    victim = ctx.store.locate("text_encode", [key])[0]
    source = stream.open_source(table, ctx.store, p, plan_of(table, p), stages=ctx.config.stages)
    tar = Path(ctx.store.root) / "shards" / "text_encode" / f"{victim.shard_id}.tar"
    if damage == "vanished shard":
        tar.unlink()
    else:
        flip_byte(tar, (header_byte if damage == "header byte" else tensor_byte)(ctx.store, "text_encode", victim))
    with pytest.raises(CacheDamaged) as e:
        with open_feed(source, p, start_step=0, max_steps=6, world=1, rank=0, device="cpu") as feed:
            for index in feed.indices:
                feed.take(index)
    assert e.value.items == {"text_encode": [key]}
    message = str(e.value)
    assert key in message and victim.shard_id in message
    assert ("shard file missing" if damage == "vanished shard" else "checksum mismatch") in message
    assert "sdxlpipe run encode" in message
    # Marked in the store: the next run's encode recomputes it.
    assert open_store(ctx.store.root).damaged("text_encode", [key]) == [key]


def _agree_in_process(rank: int, init: str, out: str) -> None:
    """One of two processes (gloo, as `accelerate launch` on CPU): agree_on_damage once per batch; rank 1
    meets damage at batch 2."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    lines = []
    for index in range(3):
        mine = None
        if (rank, index) == (1, 2):
            mine = CacheDamaged({"vae_encode": ["ab" * 16]}, "vae_encode item abab... (checksum mismatch)")
            mine.hint = "sdxlpipe run encode"
        got = stream.agree_on_damage(mine, "cpu")
        lines.append(f"{index} " + ("None" if got is None else repr([got.what, got.items, got.hint])))
    dist.destroy_process_group()
    Path(out).write_text("\n".join(lines))


def test_damage_met_by_one_process_stops_every_process_with_the_same_error(tmp_path):
    import multiprocessing

    fork = multiprocessing.get_context("fork")  # torch is imported already: forking costs no import
    init, outs = f"file://{tmp_path / 'rendezvous'}", [tmp_path / f"rank{rank}.txt" for rank in (0, 1)]
    procs = [fork.Process(target=_agree_in_process, args=(rank, init, str(outs[rank]))) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    damaged = repr(["vae_encode item abab... (checksum mismatch)", {"vae_encode": ["ab" * 16]}, "sdxlpipe run encode"])
    for out in outs:  # rank 0 met nothing itself, and stops with rank 1's error
        assert out.read_text().splitlines() == ["0 None", "1 None", f"2 {damaged}"]


# --- whole runs: damage met mid-run, remote stores through the local shard cache ---------


@pytest.fixture(scope="module")
def local_weights(tmp_path_factory) -> dict:
    """The adapter a run on a local store ends with: what every remote run must end with too."""
    ctx = make_context(tmp_path_factory.mktemp("local") / "ws")
    done = run_train(ctx, build_samples(ctx, **SAMPLES), params(**RUN))
    return load_file(done["outputs"]["adapter"])


def test_damage_found_mid_run_stops_it_after_a_checkpoint_and_the_rewritten_item_resumes_it(tmp_path, local_weights):
    p = params(**RUN)  # one checkpoint, at the end: the unbroken run `local_weights` made
    ctx = make_context(tmp_path / "ws")
    table = build_samples(ctx, **SAMPLES)
    # The first flipped latent training reads: the evaluation batches never flip, so it is met mid-run.
    plan, rows = plan_of(table, p), table.to_pylist()
    first_read: dict[str, int] = {}
    for i in range(p.max_steps):
        epoch, members = plan.batch_at(i)
        for c in pick([rows[m] for m in members], members, p, epoch, i, False):
            first_read.setdefault(c["latent_key"], i)
    flipped = {r["latent_flip_key"] for r in rows}
    index, key = max((i, k) for k, i in first_read.items() if k in flipped)
    assert index > 0
    victim = ctx.store.locate("vae_encode", [key])[0]
    payload = ctx.store.read("vae_encode", key)
    flip_byte(Path(ctx.store.root) / "shards" / "vae_encode" / f"{victim.shard_id}.tar",
              tensor_byte(ctx.store, "vae_encode", victim))
    with pytest.raises(CacheDamaged) as e:
        run_train(ctx, table, p)
    assert e.value.items == {"vae_encode": [key]}
    (run_dir,) = (ctx.workspace.root / "train").iterdir()
    assert [c.name for c in (run_dir / "checkpoints").glob("step-*")] == [f"step-{index:08d}"]
    with ctx.store.writer("vae_encode") as w:  # what `sdxlpipe run encode` does
        w.add(key, "latent.safetensors", payload)
    ctx.store.refresh()
    resumed = load_file(run_train(ctx, table, p)["outputs"]["adapter"])
    assert all(torch.equal(resumed[k], local_weights[k]) for k in local_weights)


def train_remote(root: Path, url: str, cache: Path, limit_bytes: int) -> dict:
    ctx = make_context(root, store=url)
    table = build_samples(ctx, **SAMPLES)
    assert "://" in ctx.store.url
    done = run_train(ctx, table, params(**RUN, shard_cache_dir=str(cache), shard_cache_gb=limit_bytes / (1 << 30)))
    return {"weights": load_file(done["outputs"]["adapter"]), "store": ctx.store}


def store_bytes(store) -> int:
    return sum(s["bytes"] for s in store.du()["stages"].values())


def cache_bytes(cache: Path) -> int:
    return sum(f.stat().st_size for f in cache.glob("*.tar"))


def test_a_memory_store_trains_through_a_cache_smaller_than_the_dataset(tmp_path, local_weights):
    url, cache = f"memory://sdxlpipe-stream-{tmp_path.name}/store", tmp_path / "cache"
    limit = 3 * SHARD_BYTES
    try:
        run = train_remote(tmp_path / "ws", url, cache, limit)
        assert store_bytes(run["store"]) > 2 * limit
        assert all(torch.equal(run["weights"][k], local_weights[k]) for k in local_weights)
        assert 0 < cache_bytes(cache) <= limit
    finally:
        fsspec.filesystem("memory").rm(url[len("memory://"):], recursive=True)


def test_a_batch_of_a_remote_store_is_read_by_ranges_before_its_shards_are_cached(tmp_path):
    """The first batch does not wait for whole shards: items of uncached shards are read by range."""
    url = f"memory://sdxlpipe-ranges-{tmp_path.name}/store"
    try:
        ctx = make_context(tmp_path / "ws", store=url)
        table = build_samples(ctx, **SAMPLES)
        p = params(**RUN, shard_cache_dir=str(tmp_path / "cache"))
        rows, plan = table.to_pylist(), plan_of(table, p)
        latents, texts = load_cached(rows, ctx)
        source = stream.open_source(table, ctx.store, p, plan, stages=ctx.config.stages)
        for index in range(3):  # no feed, so nothing fetches whole shards
            epoch, members = plan.batch_at(index)
            want = assemble([rows[i] for i in members], members, latents, texts, p, epoch, index, False)
            assert_same_batch(source.recover(source.read(index)), want)
        assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.tar"))
    finally:
        fsspec.filesystem("memory").rm(url[len("memory://"):], recursive=True)


@pytest.fixture
def s3_endpoint(monkeypatch):
    """moto's S3 server on 127.0.0.1, in its own process; s3fs reaches it through AWS_ENDPOINT_URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start")
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(name, value)
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("sdxlpipe-test")
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.slow  # ~30 s: an S3 server in its own process, and a request per index fragment and shard
def test_an_s3_store_trains_through_a_cache_smaller_than_the_dataset(tmp_path, s3_endpoint, local_weights):
    cache, limit = tmp_path / "cache", 3 * SHARD_BYTES
    run = train_remote(tmp_path / "ws", "s3://sdxlpipe-test/store", cache, limit)
    assert store_bytes(run["store"]) > 2 * limit
    assert all(torch.equal(run["weights"][k], local_weights[k]) for k in local_weights)
    assert 0 < cache_bytes(cache) <= limit


def test_the_shard_cache_is_shared_by_content_verified_on_arrival_and_kept_under_its_limit(tmp_path):
    fs = fsspec.filesystem("memory")
    first, second = (f"memory://sdxlpipe-cache-{tmp_path.name}/{n}" for n in ("a", "b"))
    try:
        ids = []
        for i in range(4):  # four shards of ~1 KB, the same in both stores
            data = bytes([i]) * 1000
            shard_id = xxhash.xxh3_128_hexdigest(data)
            ids.append(shard_id)
            for url in (first, second):
                fs.pipe_file(f"{url[len('memory://'):]}/shards/vae_encode/{shard_id}.tar", data)
        fs.pipe_file(f"{first[len('memory://'):]}/shards/vae_encode/{'0' * 32}.tar", b"not what the name says")
        directory = tmp_path / "cache"
        cache_a, cache_b = ShardCache(first, directory, 2500), ShardCache(second, directory, 2500)
        assert cache_a.get("vae_encode", ids[0]).read_bytes() == bytes([0]) * 1000
        assert cache_a.get("vae_encode", "0" * 32) is None  # a shard that fails its hash is never cached
        fs.rm(second[len("memory://"):], recursive=True)
        assert cache_b.get("vae_encode", ids[0]) == cache_a.local_path(ids[0])  # another store, the same copy
        with pytest.raises(FileNotFoundError):
            cache_b.get("vae_encode", ids[1])
        for shard_id in ids[1:3]:
            time.sleep(0.01)  # distinct use times
            cache_a.get("vae_encode", shard_id)
        # Three shards exceed 2500 bytes: the least recently used one went first.
        assert sorted(p.stem for p in directory.glob("*.tar")) == sorted(ids[1:3])
        time.sleep(0.01)
        cache_a.get("vae_encode", ids[1])  # used again: now ids[2] is the oldest
        cache_a.get("vae_encode", ids[3])
        assert sorted(p.stem for p in directory.glob("*.tar")) == sorted([ids[1], ids[3]])
        assert [p.name for p in directory.iterdir() if p.suffix != ".tar"] == []  # no lock or temp files left
    finally:
        fs.rm(f"/sdxlpipe-cache-{tmp_path.name}", recursive=True)


def test_the_shard_cache_refuses_a_shard_id_that_is_not_one_before_it_names_a_file(tmp_path):
    """A crafted index row's shard id must not become a path, remote or local (Store.shard_path checks it)."""
    from sdxlpipe.cache_format.shards import StoreError

    root = f"/sdxlpipe-crafted-{tmp_path.name}"
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"{root}/secret.tar", b"outside the store's shards")
    fs.pipe_file(f"{root}/store/shards/vae_encode/x.tar", b"")
    cache = ShardCache(f"memory://{root}/store", tmp_path / "cache", 1 << 20)
    try:
        for read in (lambda: cache.get("vae_encode", "../../../secret"), lambda: cache.read_range("vae_encode", "../../../secret", 0, 4),
                     lambda: cache.get("../..", "0" * 32)):
            with pytest.raises(StoreError, match="refusing shard id|cannot name a store directory"):
                read()
        assert not (tmp_path / "cache").exists() and not (tmp_path / "secret.tar").exists()
    finally:
        fs.rm(root, recursive=True)
