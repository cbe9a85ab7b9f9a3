"""Training from a published dataset over HTTP, on a machine that has nothing but the config (issue 17).

    OMP_NUM_THREADS=1 python bench/train_from_store.py                      # 300 and 3000 samples, ~1.9 GB in /tmp
    python bench/train_from_store.py --sizes 100 1000 --batches 50          # a quick look
    python bench/train_from_store.py --orders shard_blocks --block-mib 128  # one order, another block
    python bench/train_from_store.py --remote-reads 0 16 --latency-ms 20   # before/after read-ahead, 20 ms away

Writes, at each size, a store of SDXL-shaped items (fp16 mean and std of a
4x128x128 latent; 77x2048 prompt embeddings + 1280 pooled; as
bench/train_read.py) in `--shard-mib` shards (32 MiB by default, so that even
the small size spans several shards), and publishes it as dataset "bench".
Then, each in a fresh process (peak RSS is its own) on a fresh directory
with an empty shard cache, as a GPU machine would start:

- http (ranges): the store served from 127.0.0.1 by a static file server
  that answers range requests (a CDN, a bucket);
- http (no ranges): served by Python's `http.server` as it is (no range
  support: every fetch is a whole file);
- local: the same published dataset read from the local disk (the baseline).

Each in both batch orders (`train.shuffle`, decision 79): "global" (each
bucket shuffled over the epoch) and "shard_blocks" (the epoch walks the
latents' shards `--block-mib` at a time: 64 MiB, two of the bench's latent
shards, stands for the 4 GiB default on stores ~1000x these).

Each opens the dataset source as `run all` does (`pipeline/sources.py`: the
ref, the snapshot and its tables, checked), builds the batch plan, and
reads batches through the train stage's feed (`training.feed`, batch 4, two
reader threads), releasing each batch's buffers back to the feed's ring as
the loop does. Reported: requests and bytes the server sent before the
first batch was ready (the first training step's data), against the snapshot
alone, the first batch's shards and the whole store; seconds to that first
batch; samples/s over `--batches` batches, cold (empty shard cache) and warm
(the same machine again, its cache holding what the first run fetched);
the bytes the server sent over the whole cold run; peak RSS. `--remote-reads 0 16` compares
`stream.REMOTE_READS` values (the I/O threads that read the shard_blocks order's texts ahead,
decision 81) in one run; `--latency-ms` makes each answer wait as a network's round trip would. The UNet step itself is
not part of it (bench/train_step.py times steps). Prints figures measured in
one run; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MARK = "/__first_batch__"  # the child asks for this when its first batch is ready: the counters are read then


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(root: Path, n: int, shard_mib: int) -> dict:
    """n samples in a store, published as "bench"; payloads repeat from a pool of 8."""
    import pyarrow as pa
    import torch

    from sdxlpipe.cache_format import encode_tensors, open_store
    from sdxlpipe.pipeline.keys import xxh3_hex
    from sdxlpipe.pipeline.publish import PUBLISHED

    store = open_store(str(root / "store"))
    store.shard_bytes = shard_mib << 20
    g = torch.Generator().manual_seed(0)
    latents = [encode_tensors({"mean": torch.randn(4, 128, 128, generator=g).half(),
                               "std": torch.rand(4, 128, 128, generator=g).half()},
                              {"scaling_factor": "0.13025", "shift_factor": "0.0"}) for _ in range(8)]
    texts = [encode_tensors({"prompt_embeds": torch.randn(77, 2048, generator=g).half(),
                             "pooled_prompt_embeds": torch.randn(1280, generator=g).half()}) for _ in range(8)]
    lkeys, tkeys = [xxh3_hex(f"l{i}") for i in range(n)], [xxh3_hex(f"t{i}") for i in range(n + 1)]
    # Each stage writes its items in key order, as vae_encode and text_encode do (shard-sized hash
    # partitions, sorted by key): a sample's text is in no particular shard relative to its latent.
    with store.writer("vae_encode") as lw, store.writer("text_encode") as tw:
        for i in sorted(range(n), key=lkeys.__getitem__):
            lw.add(lkeys[i], "latent.safetensors", latents[i % 8])
        for i in sorted(range(n + 1), key=tkeys.__getitem__):
            tw.add(tkeys[i], "text.safetensors", texts[i % 8] if i < n else texts[0])  # n: the empty caption
    samples = pa.table({
        "key": [f"{i:016x}" for i in range(n)], "content_hash": [xxh3_hex(f"img{i}") for i in range(n)],
        "subset": ["bench"] * n, "width": [1024] * n, "height": [1024] * n, "repeats": [1] * n, "is_reg": [False] * n,
        "caption": [f"caption {i}" for i in range(n)], "caption_variants": [[f"caption {i}"] for i in range(n)],
        "bucket_w": [1024] * n, "bucket_h": [1024] * n, "resize_w": [1024] * n, "resize_h": [1024] * n,
        "crop_top": [0] * n, "crop_left": [0] * n, "latent_key": lkeys, "latent_flip_key": [None] * n,
        "text_key": tkeys[:n], "text_variant_keys": [[k] for k in tkeys[:n]], "empty_text_key": [tkeys[n]] * n,
        "validation": [False] * n,
    }).cast(PUBLISHED)
    items = {}
    for stage, field, columns, keys in (("vae_encode", "latent.safetensors", ("latent_key", "latent_flip_key"), lkeys),
                                        ("text_encode", "text.safetensors",
                                         ("text_key", "text_variant_keys", "empty_text_key"), tkeys)):
        rows, missing = store.locations_table(stage, keys, field)
        assert not missing
        items[stage] = (rows, field, columns)
    snapshot, _ = store.publish("bench", samples, items, {}, {"config": "bench/train_from_store.py", "model": "-"})
    files = [p for p in (root / "store").rglob("*") if p.is_file()]
    snap_bytes = sum(p.stat().st_size for p in (root / "store" / "datasets").rglob("*") if p.is_file())
    return {"snapshot": snapshot, "store_bytes": sum(p.stat().st_size for p in files), "snapshot_bytes": snap_bytes,
            "shards": len([p for p in files if p.suffix == ".tar"])}


class Counting(SimpleHTTPRequestHandler):
    """A static file server that counts requests and bytes sent; `ranges` answers Range requests."""

    ranges = False
    latency = 0.0  # seconds each answer waits first: a network's round trip (sleeping, so answers overlap)
    stats: dict = {}
    lock = threading.Lock()

    def log_message(self, *args) -> None:
        pass

    def _count(self, nbytes: int) -> None:
        with self.lock:
            self.stats["requests"] += 1
            self.stats["bytes"] += nbytes

    def do_HEAD(self) -> None:
        self._count(0)
        super().do_HEAD()

    def do_GET(self) -> None:
        if self.latency and self.path != MARK:
            time.sleep(self.latency)
        if self.path == MARK:
            with self.lock:
                self.stats["at_first_batch"] = dict(requests=self.stats["requests"], bytes=self.stats["bytes"])
            self.send_response(204)
            self.end_headers()
            return
        path = self.translate_path(self.path)
        wanted = self.headers.get("Range")
        if not self.ranges or not wanted or not os.path.isfile(path):
            size = os.path.getsize(path) if os.path.isfile(path) else 0
            self._count(size)
            return super().do_GET()
        size = os.path.getsize(path)
        start, _, end = wanted.removeprefix("bytes=").partition("-")
        start, end = int(start), min(int(end) if end else size - 1, size - 1)
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start + 1)
        self._count(len(data))
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Server(ThreadingHTTPServer):
    # http.server's accept queue is 5: concurrent range requests beyond it wait for a SYN retry (~1 s);
    # a CDN or a bucket accepts far more.
    request_queue_size = 128


def serve(folder: Path, ranges: bool, latency_ms: float = 0.0):
    handler = type("Handler", (Counting,), {"ranges": ranges, "stats": {"requests": 0, "bytes": 0},
                                            "latency": latency_ms / 1000})
    server = Server(("127.0.0.1", 0), partial(handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler.stats


def child(machine: Path, store: str, batches: int, mark: str | None, order: str, block_mib: int,
          remote_reads: int) -> dict:
    """A fresh machine: a config naming the published dataset, an empty shard cache; first batch, then more.
    remote_reads: `stream.REMOTE_READS`, the I/O threads that read remote items ahead (decision 81)."""
    began = time.monotonic()
    import logging

    import pyarrow as pa
    import urllib.request

    from sdxlpipe.cache_format import open_store
    from sdxlpipe.config import load_config
    from sdxlpipe.pipeline.sources import join, layered, open_datasets
    from sdxlpipe.training import layout, stream
    from sdxlpipe.training.data import plan_of
    from sdxlpipe.training.feed import open_feed

    stream.REMOTE_READS = remote_reads
    imported = time.monotonic()
    machine.mkdir(parents=True, exist_ok=True)
    (machine / "sdxlpipe.toml").write_text(
        f'model = "tiny"\n[[sources]]\nkind = "dataset"\nname = "bench"\nstore = "{store}"\n'
        f'[train]\nbatch_size = 4\nloader_workers = 2\nshard_cache_dir = "{machine / "shard-cache"}"\n'
        f'shuffle = "{order}"\nshuffle_block_gb = {block_mib / 1024}\n')
    config = load_config(machine / "sdxlpipe.toml")
    datasets = open_datasets(config, logging.getLogger("bench"), lambda: {})
    table = join(pa.table({}), datasets)
    opened = time.monotonic()
    p = config.params["train"]
    store = layered(datasets, open_store(config.store_url, create=False, missing_ok=True))
    # As the loop's `_data` does on a run's first start: the layout from where the store has the latents.
    where = layout.locate(table, store, config.stages) if p.shuffle == "shard_blocks" else None
    plan = plan_of(table, p.batch_size, p.seed, config.params["ingest"].sources, where,
                   int(p.shuffle_block_gb * (1 << 30)))
    source = stream.open_source(table, store, p, plan, stages=config.stages)
    with open_feed(source, p, start_step=0, max_steps=batches, world=1, rank=0, device="cpu") as feed:
        first = None
        for index in feed.indices:
            batch = feed.take(index)
            feed.release(index)  # as the loop does once it copied the batch out: its buffers are read into again
            if first is None:
                first = time.monotonic()
                if mark:
                    urllib.request.urlopen(mark).read()
        done = time.monotonic()
    assert batch["mean"].shape == (4, 4, 128, 128) and batch["embeds"].shape == (4, 77, 2048)
    first_shards = {(s, sh) for s, sh in source.shards(0)}
    return {"open_s": opened - imported, "first_batch_s": first - imported, "import_s": imported - began,
            "samples_s": (len(feed.indices) - 1) * 4 / max(done - first, 1e-9), "rss_mib": peak_mib(),
            "samples": table.num_rows, "first_batch_shards": len(first_shards)}


def run_child(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[300, 3000])
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--shard-mib", type=int, default=32)
    ap.add_argument("--orders", nargs="+", default=["global", "shard_blocks"], choices=["global", "shard_blocks"])
    ap.add_argument("--block-mib", type=int, default=64, help="shard_blocks' block, MiB of latent shards")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/sdxlpipe-bench-train-from-store"))
    ap.add_argument("--keep", action="store_true", help="keep the stores for another run")
    ap.add_argument("--latency-ms", type=float, default=0.0,
                    help="each answer of the server waits this long first (a network round trip; 0: localhost)")
    ap.add_argument("--remote-reads", type=int, nargs="+", default=[16],
                    help="stream.REMOTE_READS values to compare over http (0: no read-ahead of remote items); "
                         "the table shows the last")
    ap.add_argument("--child", nargs=7, metavar=("MACHINE", "STORE", "BATCHES", "MARK", "ORDER", "BLOCK_MIB", "READS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        machine, store, batches, mark, order, block_mib, reads = args.child
        print(json.dumps(child(Path(machine), store, int(batches), mark if mark != "-" else None, order, int(block_mib),
                               int(reads))))
        return
    print(f"load average {os.getloadavg()[0]:.1f}; sizes {args.sizes}; {args.batches} batches of 4; "
          f"{args.shard_mib} MiB shards; orders {args.orders}, shard_blocks of {args.block_mib} MiB; "
          f"remote reads {args.remote_reads}; latency {args.latency_ms} ms", flush=True)
    results = {}
    for n in args.sizes:
        root = args.dir / f"size-{n}"
        info_path = root / "info.json"
        if not info_path.exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            began = time.monotonic()
            info = build(root, n, args.shard_mib)
            info["build_s"] = time.monotonic() - began
            info_path.write_text(json.dumps(info))
        info = json.loads(info_path.read_text())
        for mode in ("http (ranges)", "http (no ranges)", "local"):
            for order, reads in [(o, r) for o in args.orders for r in (args.remote_reads[-1:] if mode == "local"
                                                                       else args.remote_reads)]:
                machine = args.dir / f"machine-{n}-{mode.split()[-1].strip('()')}-{order}"
                shutil.rmtree(machine, ignore_errors=True)
                how = (str(args.batches), order, str(args.block_mib), str(reads))
                if mode == "local":
                    out = run_child(str(machine), str(root / "store"), how[0], "-", *how[1:])
                else:
                    server, stats = serve(root / "store", ranges=mode == "http (ranges)", latency_ms=args.latency_ms)
                    url = f"http://127.0.0.1:{server.server_address[1]}"
                    out = run_child(str(machine), url, how[0], url + MARK, *how[1:])
                    out.update(stats.get("at_first_batch", {}), total_requests=stats["requests"],
                               total_bytes=stats["bytes"])
                    # The same machine again: its shard cache now holds what the first run fetched.
                    out["warm_samples_s"] = run_child(str(machine), url, how[0], "-", *how[1:])["samples_s"]
                    server.shutdown()
                shutil.rmtree(machine, ignore_errors=True)
                results[(n, mode, order)] = results[(n, mode, order, reads)] = out
                print(f"{n:>6} {mode:16} {order:12} reads {reads:<2} {json.dumps(out)}", flush=True)
        results[(n, "info")] = info
    print()
    small, large = args.sizes
    print("| figure | " + " | ".join(f"{n} samples" for n in args.sizes) + " |")
    print("|---|---|---|")

    def row(label, fn):
        print(f"| {label} | " + " | ".join(fn(n) for n in args.sizes) + " |")

    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    row("store (shards, snapshot)", lambda n: f"{mib(results[(n, 'info')]['store_bytes'])} ({results[(n, 'info')]['shards']} shards), "
                                              f"snapshot {mib(results[(n, 'info')]['snapshot_bytes'])}")
    for mode in ("http (ranges)", "http (no ranges)"):
        for order in args.orders:
            r = lambda n, m=mode, o=order: results[(n, m, o)]  # noqa: E731
            row(f"{mode}, {order}: requests / bytes before the first batch",
                lambda n, r=r: f"{r(n)['requests']} / {mib(r(n)['bytes'])} "
                               f"({r(n)['bytes'] / results[(n, 'info')]['store_bytes']:.1%} of the store)")
            row(f"{mode}, {order}: seconds to the first batch (open)",
                lambda n, r=r: f"{r(n)['first_batch_s']:.2f} s ({r(n)['open_s']:.2f} s)")
            row(f"{mode}, {order}: samples/s cold (warm cache), peak RSS",
                lambda n, r=r: f"{r(n)['samples_s']:.0f}/s ({r(n)['warm_samples_s']:.0f}/s), {r(n)['rss_mib']:.0f} MiB")
            row(f"{mode}, {order}: bytes sent over the cold run",
                lambda n, r=r: f"{mib(r(n)['total_bytes'])} in {r(n)['total_requests']} requests")
    for order in args.orders:
        row(f"local, {order}: seconds to the first batch (open)",
            lambda n, o=order: f"{results[(n, 'local', o)]['first_batch_s']:.2f} s ({results[(n, 'local', o)]['open_s']:.2f} s)")
        row(f"local, {order}: samples/s, peak RSS",
            lambda n, o=order: f"{results[(n, 'local', o)]['samples_s']:.0f}/s, {results[(n, 'local', o)]['rss_mib']:.0f} MiB")
    base = args.orders[0]  # the baseline: local disk in the first order (global by default)
    for mode, reads in [(m, r) for m in ("http (ranges)", "http (no ranges)") for r in args.remote_reads] + [("local", None)]:
        for order in args.orders:
            r = lambda n, m=mode, o=order, k=reads: results[(n, m, o, k) if k is not None else (n, m, o)]  # noqa: E731
            local = lambda n: results[(n, "local", base)]["samples_s"]  # noqa: E731
            warm = "" if mode == "local" else "; warm: " + ", ".join(
                f"{n}: {r(n)['warm_samples_s'] / local(n):.2f}x" for n in args.sizes)
            print(f"{mode}{'' if reads is None else f', remote reads {reads}'}, {order}: "
                  f"{r(large)['total_bytes'] / 2**20 if mode != 'local' else 0:.0f} MiB sent at {large}; peak RSS {large} vs {small} samples: {r(large)['rss_mib'] / r(small)['rss_mib']:.2f}x; "
                  f"samples/s vs local {base}: " + ", ".join(f"{n}: {r(n)['samples_s'] / local(n):.2f}x" for n in args.sizes)
                  + warm)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
