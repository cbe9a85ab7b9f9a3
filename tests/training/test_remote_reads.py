"""Remote items read ahead of the reader threads (decision 81): a store over HTTP with range requests, in the
shard_blocks order, whose text embeddings are read by range. The batches are the local store's, bit for bit,
and the range requests in flight never pass `stream.REMOTE_READS` plus the loader's own threads."""

from __future__ import annotations

import os
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from sdxlpipe.cache_format import open_store
from sdxlpipe.training import layout, stream
from sdxlpipe.training.data import plan_of
from sdxlpipe.training.feed import Feed
from tests.training.conftest import build_samples, make_context, params

FIELDS = {"vae_encode": "latent.safetensors", "text_encode": "text.safetensors"}
# Each text range request is held this long by the server (first part), so requests started together overlap
# even on a loaded machine.
DELAY = 0.1


class Ranges(SimpleHTTPRequestHandler):
    """A static file server that answers Range requests (as a CDN or a bucket does) and records how many
    text item ranges it is answering at once."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        path, wanted = self.translate_path(self.path), self.headers.get("Range")
        if not wanted or not os.path.isfile(path):
            return super().do_GET()
        text = "/shards/text_encode/" in self.path
        with self.server.lock:
            self.server.now += text
            self.server.most = max(self.server.most, self.server.now)
            self.server.texts += text
        try:
            if text:
                time.sleep(self.server.delay)
            size = os.path.getsize(path)
            start, _, end = wanted.removeprefix("bytes=").partition("-")
            start, end = int(start), min(int(end) if end else size - 1, size - 1)
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(end - start + 1)
        finally:
            # Done before the answer is sent: a client that has the answer may ask again at once, and that
            # request must not be counted as in flight beside this one.
            with self.server.lock:
                self.server.now -= text
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def served(tmp_path):
    """A workspace's store of 24 samples, each item in a shard of its own, and the same store over HTTP."""
    ctx = make_context(tmp_path / "ws")
    table = build_samples(ctx, 24, shard_bytes=1500)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Ranges, directory=str(ctx.store.root)))
    server.lock, server.now, server.most, server.texts, server.delay = threading.Lock(), 0, 0, 0, DELAY
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield ctx, table, server
    finally:
        server.shutdown()
        server.server_close()


def _over_http(ctx, table, server):
    """The store read-only over HTTP, its stages served from the local store's item rows (as a snapshot pins them)."""
    remote = open_store(f"http://127.0.0.1:{server.server_address[1]}", create=False, read_only=True)
    for stage, field in FIELDS.items():
        columns = ("latent_key",) if stage == "vae_encode" else ("text_key", "empty_text_key")
        keys = [k for c in columns for k in table.column(c).to_pylist()]
        rows, missing = ctx.store.locations_table(stage, keys, field)
        assert not missing
        remote.pin(stage, rows, f"test-{stage}.parquet")
    return remote


def _batches(ctx, table, store, p, workers: int, prefetch: int) -> list[dict]:
    where = layout.locate(table, ctx.store, ctx.config.stages)
    plan = plan_of(table, p.batch_size, p.seed, (), where, 4000)
    source = stream.open_source(table, store, p, plan, stages=ctx.config.stages)
    out = []
    with Feed(source, range(2 * plan.per_epoch), workers, prefetch) as feed:
        for index in feed.indices:
            batch = feed.take(index)
            out.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
            feed.release(index)
    return out


def _equal(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k]
                                     for k in x) for x, y in zip(a, b))


def test_remote_texts_read_ahead_give_the_local_batches_with_bounded_requests_in_flight(served, tmp_path,
                                                                                        monkeypatch):
    ctx, table, server = served
    remote = _over_http(ctx, table, server)
    p = params(shuffle="shard_blocks", shard_cache_dir=str(tmp_path / "cache"), batch_size=2)
    local = _batches(ctx, table, ctx.store, p, workers=1, prefetch=4)
    assert len(local) == 24

    # One reader thread and batches of 2: without reading ahead, at most 2 texts would be in flight at once.
    monkeypatch.setattr(stream, "REMOTE_READS", 3)
    ahead = _batches(ctx, table, remote, p, workers=1, prefetch=4)
    assert _equal(ahead, local), "the same batches, in the same order, bit for bit"
    assert server.texts == 2 * 24, "each text read by range once per use: no more requests than before"
    assert server.most == 3, f"{server.most} text range requests in flight at once (REMOTE_READS = 3)"

    # Without the I/O threads, each text is read in the reader thread: the same batches, one request at a time.
    monkeypatch.setattr(stream, "REMOTE_READS", 0)
    server.most, server.delay = 0, 0.0
    p = params(shuffle="shard_blocks", shard_cache_dir=str(tmp_path / "cache-0"), batch_size=2)
    assert _equal(_batches(ctx, table, remote, p, workers=1, prefetch=4), local)
    assert server.most == 1
