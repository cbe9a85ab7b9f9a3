"""The store against a real S3 API: moto's server on 127.0.0.1, reached through s3fs."""

from __future__ import annotations

import threading

import fsspec
import pytest

from sdxlpipe.cache_format import open_store

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

FIELD = "latent.safetensors"


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # a free port
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_url(s3_endpoint, monkeypatch, request):
    import s3fs

    options = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": s3_endpoint}}
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setitem(fsspec.config.conf, "s3", options)
    bucket = "store-" + request.node.name.replace("_", "-")[-40:].strip("-").lower()
    s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}/store"


def test_two_writers_on_s3_commit_and_a_refresh_sees_the_others_commit(s3_url, payloads):
    keys = sorted(payloads)[:6]
    payloads = {k: payloads[k] for k in keys}
    reader = open_store(s3_url)
    assert reader.missing("vae", keys) == keys

    def write(share: list[str]) -> None:
        store = open_store(s3_url)
        for key in share:  # one shard, one fragment per item
            with store.writer("vae") as w:
                w.add(key, FIELD, payloads[key])

    threads = [threading.Thread(target=write, args=(keys[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reader.missing("vae", keys) == keys  # cached until refresh
    reader.refresh()
    assert reader.missing("vae", []) == [] and reader.missing("vae", keys) == []
    assert all(reader.read("vae", k, FIELD) == payloads[k] for k in keys)
    assert dict(reader.read_many("vae", keys, FIELD)) == payloads

    index = reader._index("vae")
    before = index.reads
    other = open_store(s3_url)
    with other.writer("vae") as w:
        w.add("e" * 32, FIELD, b"late")
    reader.refresh()
    assert reader.read("vae", "e" * 32, FIELD) == b"late"
    assert index.reads == before + 1  # only the new fragment was fetched

    fs = fsspec.filesystem("s3")
    root = s3_url[len("s3://"):]
    assert not fs.exists(f"{root}/tmp") or fs.ls(f"{root}/tmp") == []  # S3's PUT is atomic: no temp objects
    assert reader.verify("vae") == []


def test_a_commit_on_s3_puts_each_object_at_its_final_name_and_never_touches_tmp(s3_url, payloads):
    store = open_store(s3_url)
    calls: list[tuple[str, str]] = []  # (S3 operation, key or prefix) of every request the store makes

    def record(params, event_name, **_):
        calls.append((event_name.rsplit(".", 1)[-1], params.get("Key") or params.get("Prefix") or ""))

    store.fs.connect()
    store.fs.s3.meta.events.register("provide-client-params.s3", record)
    with store.writer("vae") as w:
        for key in sorted(payloads)[:3]:
            w.add(key, FIELD, payloads[key])
    (shard_id,) = w.shard_ids

    assert calls, "the event hook saw no request: the test would prove nothing"
    root = s3_url[len("s3://"):].split("/", 1)[1]
    assert not [c for c in calls if "tmp" in c[1].split("/")]  # nothing written, listed or read under tmp/
    assert not [op for op, _ in calls if op in ("CopyObject", "UploadPartCopy", "DeleteObject", "DeleteObjects")]
    puts = {key for op, key in calls if op in ("PutObject", "CreateMultipartUpload")}
    assert {f"{root}/shards/vae/{shard_id}.tar", f"{root}/shards/vae/{shard_id}.json",
            f"{root}/index/vae/{shard_id}.parquet"} <= puts
    assert dict(open_store(s3_url).read_many("vae", sorted(payloads)[:3], FIELD)) == {
        k: payloads[k] for k in sorted(payloads)[:3]}


def test_a_rerun_on_s3_fetches_only_the_fragments_its_index_cache_lacks(s3_url, payloads, tmp_path, monkeypatch):
    monkeypatch.setenv("SDXLPIPE_INDEX_CACHE", str(tmp_path / "index-cache"))
    keys = sorted(payloads)[:4]
    for key in keys[:3]:  # three fragments
        with open_store(s3_url).writer("vae") as w:
            w.add(key, FIELD, payloads[key])
    first = open_store(s3_url)
    assert first.missing("vae", keys) == keys[3:] and first._index("vae").reads == 3

    rerun = open_store(s3_url)
    assert rerun.missing("vae", keys) == keys[3:]
    assert (rerun._index("vae").reads, rerun._index("vae").from_cache) == (0, 3)  # nothing fetched

    with open_store(s3_url).writer("vae") as w:  # another machine commits
        w.add(keys[3], FIELD, payloads[keys[3]])
    later = open_store(s3_url)
    assert later.missing("vae", keys) == [] and later._index("vae").reads == 1
    assert later.read("vae", keys[3], FIELD) == payloads[keys[3]]
