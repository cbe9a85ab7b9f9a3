"""How fast and how lean the train stage's loader reads batches, at two dataset sizes.

    OMP_NUM_THREADS=1 python bench/train_read.py                      # 1000 and 5000 samples, ~3.5 GB in /tmp
    python bench/train_read.py --sizes 500 2500 --batches 200         # a quick look

Writes its own store of SDXL-shaped items (fp16 mean and std of a 4x128x128
latent; 77x2048 prompt embeddings + 1280 pooled, fp16), all in the 1024x1024
bucket, in 256 MiB shards as the encode stages write them, at each size; then,
each in a fresh process so peak RSS is its own:

- loader: the train stage's `training.feed` feed (batch 4, 2 reader threads; and
  0, reading in the training thread; and 2 plus the fp32 conversion the loop
  makes of each batch) over the first `--batches` batches of the plan:
  samples/s, CPU ms per sample, time to the first batch (from opening the
  store, the table already read), peak RSS;
- raw: a sequential read of the same number of bytes of the shard files
  (8 MiB reads): the disk/page-cache ceiling;
- npz: kohya's layout (per image: fp32 latents `.npz` and fp32 text-encoder
  outputs `_te_outputs.npz`), read by a DataLoader with 2 workers, batch 4;
- file://: the same store behind a `file://` URL, read through the local
  shard cache, cold (empty cache) and warm (second run);
- train RSS: the train stage itself (tiny UNet, 256 px latents, 4 steps) on N
  and 8N samples, and for comparison the old path (`tests/training/reference_batches.load_cached`,
  every payload in RAM) on the same stores.

mosaicml-streaming (the peer for streaming) is not measured: no release
installs beside numpy 2.4 and torch 2.13 (0.13.0 needs numpy<2.2; older ones
torch<2 or numpy<2). The files stay in the page cache on a 24 GiB machine,
so raw and loader figures are CPU figures, not disk figures. Prints ratios
measured within one run; asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def peak_mib(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def build_store(root: Path, n: int) -> None:
    """n SDXL-shaped samples; payloads repeat from a pool of 8 (bytes do not change read speed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from sdxlpipe.cache_format import encode_tensors, open_store
    from sdxlpipe.pipeline.keys import xxh3_hex

    store = open_store(str(root / "store"))
    g = torch.Generator().manual_seed(0)
    latents = [encode_tensors({"mean": torch.randn(4, 128, 128, generator=g).half(),
                               "std": torch.rand(4, 128, 128, generator=g).half()},
                              {"scaling_factor": "0.13025", "shift_factor": "0.0"}) for _ in range(8)]
    texts = [encode_tensors({"prompt_embeds": torch.randn(77, 2048, generator=g).half(),
                             "pooled_prompt_embeds": torch.randn(1280, generator=g).half()}) for _ in range(8)]
    key = lambda name: xxh3_hex(name)  # store keys are xxh3-128 hex digests
    with store.writer("vae_encode") as lw, store.writer("text_encode") as tw:
        for i in range(n):
            lw.add(key(f"l{i}"), "latent.safetensors", latents[i % 8])
            tw.add(key(f"t{i}"), "text.safetensors", texts[i % 8])
    rows = [{"latent_key": key(f"l{i}"), "latent_flip_key": None, "text_key": key(f"t{i}"), "text_variant_keys": None,
             "empty_text_key": None, "caption": "", "caption_variants": None, "repeats": 1, "is_reg": False,
             "width": 1024, "height": 1024, "resize_w": 1024, "resize_h": 1024, "crop_top": 0, "crop_left": 0,
             "bucket_w": 1024, "bucket_h": 1024} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), root / "table.parquet")


def build_npz(root: Path, n: int) -> None:
    """kohya's cache layout: fp32 latents per image, fp32 text-encoder outputs per image."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = root / "npz"
    out.mkdir(exist_ok=True)
    lat = [rng.standard_normal((4, 128, 128), dtype=np.float32) for _ in range(8)]
    te = [(rng.standard_normal((77, 768), dtype=np.float32), rng.standard_normal((77, 1280), dtype=np.float32),
           rng.standard_normal(1280, dtype=np.float32)) for _ in range(8)]
    for i in range(n):
        np.savez(out / f"{i:06d}_1024x1024_sdxl.npz", latents=lat[i % 8], original_size=np.array([1024, 1024]),
                 crop_ltrb=np.array([0, 0, 1024, 1024]))
        h1, h2, pool = te[i % 8]
        np.savez(out / f"{i:06d}_te_outputs.npz", hidden_state1=h1, hidden_state2=h2, pool2=pool)


def child_loader(root: Path, batches: int, url: str | None, cache: str | None, workers: int = 2,
                 fp32: bool = False, release: bool = True) -> dict:
    """The train stage's feed; fp32: also make each batch fp32 as the training loop does (on a CPU host
    that conversion is part of the step; on a GPU it happens on the device). release: hand each batch's
    buffers back to the feed's ring once used, as the loop does (False: fresh buffers for every batch,
    the loader before the ring)."""
    began = time.monotonic()
    import pyarrow.parquet as pq
    import torch

    from sdxlpipe.cache_format import open_store
    from sdxlpipe.stages import load_stages
    from sdxlpipe.stages.train import Params
    from sdxlpipe.training import stream
    from sdxlpipe.training.batches import as_float
    from sdxlpipe.training.data import BatchPlan
    from sdxlpipe.training.feed import open_feed

    table = pq.read_table(root / "table.parquet")  # the train stage has its table already
    imported = time.monotonic()
    cpu = time.process_time()
    store = open_store(url or str(root / "store"), create=False)
    p = dataclasses.replace(Params(), batch_size=4, loader_workers=workers, shard_cache_dir=cache or "")
    plan = BatchPlan([(1024, 1024)] * table.num_rows, [1] * table.num_rows, 4, 0)
    source = stream.open_source(table, store, p, plan, stages=load_stages())
    with open_feed(source, p, start_step=0, max_steps=batches, world=1, rank=0, device="cpu") as feed:
        first = None
        for index in feed.indices:
            batch = feed.take(index)
            shapes = (tuple(batch["mean"].shape), tuple(batch["embeds"].shape))
            if fp32:
                batch = as_float(batch)
            if release:
                feed.release(index)
            if first is None:
                first, first_cpu = time.monotonic(), time.process_time()
        done, done_cpu = time.monotonic(), time.process_time()
    assert shapes == ((4, 4, 128, 128), (4, 77, 2048))
    n = len(feed.indices) * 4
    return {"samples_s": (n - 4) / (done - first), "first_batch_s": first - imported,
            "rss_main_mib": peak_mib(), "rss_worker_mib": peak_mib(resource.RUSAGE_CHILDREN),
            "cpu_ms_per_sample": (time.process_time() - cpu) / n * 1000,
            # After the first batch: the steady read, without opening the store and checking every key.
            "steady_cpu_ms_per_sample": (done_cpu - first_cpu) / (n - 4) * 1000,
            "store_open_to_done_s": done - imported, "import_s": imported - began}


def child_raw(root: Path, batches: int) -> dict:
    per_sample = sum(f.stat().st_size for f in (root / "store" / "shards").rglob("*.tar")) / int(root.name.split("-")[1])
    budget = int(per_sample * batches * 4)
    began, read, cpu = time.monotonic(), 0, time.process_time()
    for tar in sorted((root / "store" / "shards").rglob("*.tar")):
        with open(tar, "rb", buffering=0) as f:
            while read < budget and (chunk := f.read(8 << 20)):
                read += len(chunk)
        if read >= budget:
            break
    return {"samples_s": read / per_sample / (time.monotonic() - began), "rss_main_mib": peak_mib(),
            "cpu_ms_per_sample": (time.process_time() - cpu) / (read / per_sample) * 1000}


def child_npz(root: Path, batches: int) -> dict:
    import numpy as np
    import torch

    class Npz(torch.utils.data.Dataset):
        def __len__(self):
            return batches

        def __getitem__(self, b):
            lat, h1, h2, pool = [], [], [], []
            for i in range(b * 4, b * 4 + 4):
                with np.load(root / "npz" / f"{i:06d}_1024x1024_sdxl.npz") as z:
                    lat.append(torch.from_numpy(z["latents"]))
                with np.load(root / "npz" / f"{i:06d}_te_outputs.npz") as z:
                    h1.append(torch.from_numpy(z["hidden_state1"]))
                    h2.append(torch.from_numpy(z["hidden_state2"]))
                    pool.append(torch.from_numpy(z["pool2"]))
            return {"latents": torch.stack(lat), "embeds": torch.cat([torch.stack(h1), torch.stack(h2)], -1),
                    "pooled": torch.stack(pool)}

    loader = torch.utils.data.DataLoader(Npz(), batch_size=None, num_workers=2, prefetch_factor=2)
    began, first = time.monotonic(), None
    for batch in loader:
        first = first or time.monotonic()
    return {"samples_s": (batches - 1) * 4 / (time.monotonic() - first), "first_batch_s": first - began,
            "rss_main_mib": peak_mib()}


def child_train(root: Path, n: int, old_path: bool) -> dict:
    """The train stage (or the old all-in-RAM read) on n tiny-shaped samples at 256 px."""
    import torch

    torch.set_num_threads(1)
    from tests.training.conftest import build_samples, make_context, params, run_train

    ctx = make_context(root / f"train-{n}-{'old' if old_path else 'stream'}")
    table = build_samples(ctx, n, size=256)
    base = peak_mib()
    if old_path:
        from tests.training.reference_batches import load_cached

        ctx.store.refresh()
        latents, texts = load_cached(table.to_pylist(), ctx)
        return {"rss_main_mib": peak_mib(), "rss_before_mib": base, "items": len(latents) + len(texts)}
    done = run_train(ctx, table, params(batch_size=2, max_steps=4, save_every_steps=4, loader_workers=2))
    return {"rss_main_mib": peak_mib(), "rss_before_mib": base, "steps": done["steps"]}


def run_child(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"bench child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs=2, default=[1000, 5000])
    parser.add_argument("--batches", type=int, default=250, help="batches of 4 read per measurement")
    parser.add_argument("--train-sizes", type=int, nargs=2, default=[250, 2000])
    parser.add_argument("--dir", default="/tmp/sdxlpipe-bench-read")
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        kind, root, *rest = args.child
        fn = {"loader": lambda: child_loader(Path(root), int(rest[0]), *(rest[1:] or [None, None])),
              "loader0": lambda: child_loader(Path(root), int(rest[0]), None, None, workers=0),
              "loader32": lambda: child_loader(Path(root), int(rest[0]), None, None, fp32=True),
              "fresh": lambda: child_loader(Path(root), int(rest[0]), None, None, release=False),
              "raw": lambda: child_raw(Path(root), int(rest[0])), "npz": lambda: child_npz(Path(root), int(rest[0])),
              "build": lambda: build_store(Path(root), int(rest[0])) or {},
              "npzbuild": lambda: build_npz(Path(root), int(rest[0])) or {},
              "train": lambda: child_train(Path(root), int(rest[0]), rest[1] == "old")}[kind]
        print(json.dumps(fn()))
        return

    base = Path(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    results: dict = {}
    for n in args.sizes:
        root = base / f"n-{n}"
        root.mkdir(parents=True)
        t = time.monotonic()
        run_child("build", str(root), str(n))
        print(f"[{n} samples] store written in {time.monotonic() - t:.0f} s", file=sys.stderr)
        r = results[n] = {"loader": run_child("loader", str(root), str(args.batches)),
                          "loader0": run_child("loader0", str(root), str(args.batches)),
                          "loader32": run_child("loader32", str(root), str(args.batches)),
                          "fresh": run_child("fresh", str(root), str(args.batches)),
                          "raw": run_child("raw", str(root), str(args.batches))}
        if n == args.sizes[0]:
            run_child("npzbuild", str(root), str(args.batches * 4))
            r["npz"] = run_child("npz", str(root), str(args.batches))
        cache = base / f"cache-{n}"
        for temp in ("cold", "warm"):
            r[f"file_{temp}"] = run_child("loader", str(root), str(args.batches), f"file://{root / 'store'}", str(cache))
        shutil.rmtree(cache)
        print(json.dumps({n: r}), file=sys.stderr)
    small, large = args.train_sizes
    for n in (small, large):
        results[f"train-{n}"] = run_child("train", str(base), str(n), "stream")
        results[f"old-{n}"] = run_child("train", str(base), str(n), "old")

    a, b = args.sizes
    print(f"## train_read: batch 4, 2 reader threads, {args.batches} batches per figure; sizes {a} and {b} samples")
    print("| figure | %d | %d |" % (a, b))
    print("|---|---|---|")
    row = lambda name, f: print(f"| {name} | " + " | ".join(f(results[n]) for n in (a, b)) + " |")
    row("loader samples/s (fp16 batches, as stored)", lambda r: f"{r['loader']['samples_s']:.0f}")
    row("loader, 0 workers (read in the training thread) samples/s", lambda r: f"{r['loader0']['samples_s']:.0f}")
    row("loader + fp32 conversion (what a CPU step adds) samples/s", lambda r: f"{r['loader32']['samples_s']:.0f}")
    row("raw read samples/s", lambda r: f"{r['raw']['samples_s']:.0f}")
    row("loader / raw", lambda r: f"{r['loader']['samples_s'] / r['raw']['samples_s']:.2f}x")
    row("loader, 0 workers / raw", lambda r: f"{r['loader0']['samples_s'] / r['raw']['samples_s']:.2f}x")
    row("loader + fp32 / raw", lambda r: f"{r['loader32']['samples_s'] / r['raw']['samples_s']:.2f}x")
    row("loader without the ring (fresh buffers per batch) / raw",
        lambda r: f"{r['fresh']['samples_s'] / r['raw']['samples_s']:.2f}x")
    row("CPU ms per sample: loader / 0 workers / no ring / raw", lambda r: f"{r['loader']['cpu_ms_per_sample']:.2f} / "
        f"{r['loader0']['cpu_ms_per_sample']:.2f} / {r['fresh']['cpu_ms_per_sample']:.2f} / "
        f"{r['raw']['cpu_ms_per_sample']:.2f}")
    row("the same after the first batch (steady reads; raw as above)",
        lambda r: f"{r['loader']['steady_cpu_ms_per_sample']:.2f} / {r['loader0']['steady_cpu_ms_per_sample']:.2f} / "
        f"{r['fresh']['steady_cpu_ms_per_sample']:.2f} / {r['raw']['cpu_ms_per_sample']:.2f}")
    row("raw / loader in steady CPU per sample (2 threads; 0 workers)",
        lambda r: f"{r['raw']['cpu_ms_per_sample'] / r['loader']['steady_cpu_ms_per_sample']:.2f}x; "
        f"{r['raw']['cpu_ms_per_sample'] / r['loader0']['steady_cpu_ms_per_sample']:.2f}x")
    row("kohya npz samples/s", lambda r: f"{r['npz']['samples_s']:.0f}" if "npz" in r else "-")
    row("loader / npz", lambda r: f"{r['loader']['samples_s'] / r['npz']['samples_s']:.2f}x" if "npz" in r else "-")
    row("loader + fp32 / npz", lambda r: f"{r['loader32']['samples_s'] / r['npz']['samples_s']:.2f}x" if "npz" in r else "-")
    row("loader peak RSS main / worker MiB", lambda r: f"{r['loader']['rss_main_mib']:.0f} / {r['loader']['rss_worker_mib']:.0f}")
    row("time to first batch s", lambda r: f"{r['loader']['first_batch_s']:.2f}")
    for temp in ("cold", "warm"):
        row(f"file:// {temp} samples/s", lambda r: f"{r[f'file_{temp}']['samples_s']:.0f}")
        row(f"file:// {temp} first batch s", lambda r: f"{r[f'file_{temp}']['first_batch_s']:.2f}")
        row(f"file:// {temp} peak RSS main / worker MiB",
            lambda r: f"{r[f'file_{temp}']['rss_main_mib']:.0f} / {r[f'file_{temp}']['rss_worker_mib']:.0f}")
    ra, rb = results[a]["loader"], results[b]["loader"]
    print(f"\nloader RSS {b} / {a}: {rb['rss_main_mib'] / ra['rss_main_mib']:.3f}x (target <= 1.1x); "
          f"first batch {b} / {a}: {rb['first_batch_s'] / ra['first_batch_s']:.2f}x")
    ts, tl, os_, ol = results[f"train-{small}"], results[f"train-{large}"], results[f"old-{small}"], results[f"old-{large}"]
    print(f"train stage peak RSS, {small} vs {large} samples (256 px, tiny UNet): {ts['rss_main_mib']:.0f} vs "
          f"{tl['rss_main_mib']:.0f} MiB = {tl['rss_main_mib'] / ts['rss_main_mib']:.3f}x (target <= 1.15x)")
    print(f"old in-RAM read, same stores: {os_['rss_main_mib']:.0f} vs {ol['rss_main_mib']:.0f} MiB = "
          f"{ol['rss_main_mib'] / os_['rss_main_mib']:.3f}x")
    print(json.dumps(results, default=str), file=sys.stderr)


if __name__ == "__main__":
    main()
