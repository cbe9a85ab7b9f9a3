"""The store and the pipeline at a million samples: prints figures, asserts nothing.

    python bench/scale.py index [--rows 100000 1000000] [--fragments 1000]
    python bench/scale.py noop [--images 2000] [--workdir DIR]
    python bench/scale.py e2e [--files 100000] [--px 32] [--workdir DIR] [--no-incremental]

index: makes stores of real index fragments (1,000 of them; keys, shard ids
and checksums are real xxh3 hex, the shards they point at are not written)
and measures, each store loaded in a fresh process:
  load       time and peak RSS (growth over the process after imports) of the
             first lookup: without the local index cache (every fragment
             parsed), with an empty cache (parsed, then the cache written), a
             rerun (the cache covers every fragment), and a rerun after
             another writer added 10 fragments (only those parsed)
  missing    store.missing() for 10k keys (half present) against the store
  plan       a vae_encode over every row planned the way the stage does it:
             one missing() over all keys, then per chunk of 906 keys (SDXL
             1024^2 latents fill a 256 MiB shard with 906) one refresh and one
             missing(); with 0% missing, and with 1% missing where each chunk
             with work commits one real shard (that write time reported apart)
keys: vae_encode's item keys of --key-rows rows computed from the table's
  columns (as the stage does), against the per-row reference in the same process
noop: a real folder of small images, `sdxlpipe run all` once to fill the store
  (tiny model, 64 px, 1 training step), then the no-op `run all`, `status` and
  `sdxlpipe --help` in fresh processes (bytecode cached, one warm-up), best of 3 each
  in wall and in CPU seconds, as ratios to --help; and both again with the no-op
  record ignored (SDXLPIPE_NO_RECORD=1: the normal path).
e2e: N distinct small PNGs (--px, default 32) with a caption file each, 1,000 to a
  folder; one full `run all` (tiny model, every stage, 1 training step); one kohya
  .npz per image. Then, in one run: no-op `run all` and `status` (with and without
  the record) against `sdxlpipe --help`, an os.scandir + stat walk of the images
  folder and kohya's startup check (open each .npz, read its keys and the latents'
  shape), the walk and the check timed in this process after a warm-up.
  Incremental (unless --no-incremental): new bytes for 1% of the images and new
  captions for another 1%, one `run all`: what each stage computed and the time
  against the first full run.
Targets (issue 8): load <= 2 s in <= 300 MB, missing 10k <= 50 ms, planning a
1M encode <= 60 s; no-op run all over 2k images <= 2x --help; over 100k files
(no-op - --help) <= 3x the stat walk and >= 50x faster than the npz check.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
STAGE = "vae_encode"
FIELD = "latent.safetensors"
CHUNK = 906  # SDXL 1024^2: mean+std fp16 (+mask) per item, 256 MiB shards -> 906 items


def make_index_store(root: Path, rows: int, fragments: int, seed: int = 0) -> None:
    """A store whose index holds `rows` rows in `fragments` fragments, written to the spec
    (into an existing store: more fragments, from another seed)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sdxlpipe.cache_format import open_store

    open_store(str(root))
    directory = root / "index" / STAGE
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per = -(-rows // fragments)
    for f in range(fragments):
        n = min(per, rows - f * per)
        if n <= 0:
            break
        raw = rng.integers(0, 2**63, (n, 4), dtype=np.int64)
        hexes = [f"{a:016x}{b:016x}" for a, b in raw[:, :2].tolist()]
        sums = [f"{a:016x}{b:016x}" for a, b in raw[:, 2:].tolist()]
        shard = secrets.token_hex(16)
        length = 296_000
        table = pa.table({
            "item_key": hexes, "field": [FIELD] * n, "shard_id": [shard] * n,
            "offset": pa.array(np.arange(n, dtype=np.int64) * (length + 1536) + 1024),
            "length": pa.array(np.full(n, length, np.int64)), "xxh3": sums, "group": ["vae:bench"] * n,
        })
        pq.write_table(table, directory / f"{shard}.parquet")


def all_keys(root: Path) -> list[str]:
    import pyarrow.parquet as pq

    keys = []
    for p in sorted((root / "index" / STAGE).glob("*.parquet")):
        keys += pq.ParquetFile(p).read(columns=["item_key"]).column(0).to_pylist()
    return keys


def child_index(root: str, plan_missing: float | None) -> dict:
    """Runs in a fresh process: load, missing(10k), and (optionally) plan over every key."""
    import random

    from sdxlpipe.cache_format import open_store

    root_p = Path(root)
    keys = all_keys(root_p)  # before the baseline: the benchmark's own key list
    rng = random.Random(0)
    probe = rng.sample(keys, 5000) + [secrets.token_hex(16) for _ in range(5000)]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    store = open_store(root)
    t, cpu = time.perf_counter(), _cpu()
    store.missing(STAGE, [])  # the first lookup lists and reads every fragment
    load, load_cpu = time.perf_counter() - t, _cpu() - cpu
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    index = store._index(STAGE)
    times, cpus = [], []
    for _ in range(5):
        t, c = time.perf_counter(), _cpu()
        absent = store.missing(STAGE, probe)
        times.append(time.perf_counter() - t)
        cpus.append(_cpu() - c)
    out = {"rows": len(keys), "load_s": load, "load_cpu_s": load_cpu, "load_peak_mb": peak, "missing10k_s": min(times),
           "missing10k_cpu_s": min(cpus), "missing10k_found": len(absent), "parsed": index.reads,
           "from_cache": index.from_cache}
    if plan_missing is not None:
        out.update(plan(store, keys, plan_missing, rng))
    return out


def _cpu() -> float:
    """CPU seconds of this process (all threads): a shared, loaded machine stretches wall time."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def plan(store, keys: list[str], share: float, rng) -> dict:
    """Plan a vae_encode over `keys` as the stage does; `share` of them are absent (new images)."""
    extra = [secrets.token_hex(16) for _ in range(int(len(keys) * share))]
    wanted = keys + extra
    rng.shuffle(wanted)
    chunks = [wanted[i:i + CHUNK] for i in range(0, len(wanted), CHUNK)]
    t, cpu0 = time.perf_counter(), _cpu()
    todo = set(store.missing(STAGE, wanted))
    first = time.perf_counter() - t
    between, writing, commits, cpu = 0.0, 0.0, 0, _cpu() - cpu0
    for chunk in chunks:
        t, c = time.perf_counter(), _cpu()
        store.refresh(STAGE)
        need = [k for k in store.missing(STAGE, chunk) if k in todo]
        store.housekeep(STAGE)
        between += time.perf_counter() - t
        cpu += _cpu() - c
        if need:
            t = time.perf_counter()
            with store.writer(STAGE) as w:
                for k in need:
                    w.add(k, FIELD, b"x" * 64)
            writing += time.perf_counter() - t
            commits += 1
    return {"plan_share": share, "plan_first_s": first, "plan_cpu_s": cpu, "plan_between_s": between,
            "plan_total_s": first + between, "chunks": len(chunks), "commits": commits,
            "write_s": writing, "todo": len(todo)}


def run_child(args: list[str], cache: Path | None = None) -> dict:
    """cache: the index cache directory the child uses (SDXLPIPE_INDEX_CACHE)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SDXLPIPE_INDEX_CACHE": str(cache) if cache else "off"}
    out = subprocess.run([sys.executable, __file__, *args], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_index(rows_list: list[int], fragments: int) -> None:
    print(f"# index: {fragments} fragments; python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")

    def show(what: str, r: dict) -> None:
        print(f"  {what}: load {r['load_s']:.2f} s wall, {r['load_cpu_s']:.2f} s CPU (target <= 2 s), "
              f"peak +{r['load_peak_mb']:.0f} MB (target <= 300); {r['parsed']} fragments parsed, "
              f"{r['from_cache']} from the index cache; missing(10k) {r['missing10k_s'] * 1000:.1f} ms wall, "
              f"{r['missing10k_cpu_s'] * 1000:.1f} ms CPU (target <= 50), found {r['missing10k_found']} absent")

    for rows in rows_list:
        with tempfile.TemporaryDirectory() as tmp:
            root, cache = Path(tmp) / "store", Path(tmp) / "index-cache"
            t = time.perf_counter()
            make_index_store(root, rows, fragments)
            print(f"rows {rows:>9,}: store made in {time.perf_counter() - t:.1f} s")
            show("no index cache (every fragment parsed)", run_child(["--child-index", str(root)]))
            show("first run, cache empty (parses, then writes the cache)", run_child(["--child-index", str(root)], cache))
            show("rerun (cache covers every fragment)", run_child(["--child-index", str(root)], cache))
            make_index_store(root, rows // fragments * 10, 10, seed=1)
            show("rerun after another writer added 10 fragments", run_child(["--child-index", str(root)], cache))
            if rows >= 1_000_000:
                for share in (0.0, 0.01):
                    p = run_child(["--child-index", str(root), "--plan", str(share)], cache)
                    print(f"  plan {share:.0%} missing: {p['plan_total_s']:.1f} s wall, {p['plan_cpu_s']:.1f} s CPU "
                          f"(target <= 60) = first missing() "
                          f"{p['plan_first_s']:.2f} s + {p['chunks']} chunks' refresh+missing+housekeeping "
                          f"{p['plan_between_s']:.1f} s; {p['commits']} shards committed in {p['write_s']:.1f} s "
                          f"(not planning); {p['todo']} to compute")


# -- item keys ---------------------------------------------------------------------------


def bench_keys(rows: int, reference: bool) -> None:
    """vae_encode's keys of `rows` rows from the table's columns (the stage's way), and with
    `reference` the per-row way it replaced (a dict and a json.dumps per row), in one process."""
    import numpy as np
    import pyarrow as pa

    from sdxlpipe.pipeline.keys import item_key
    from sdxlpipe.stages import vae_encode

    rng = np.random.default_rng(0)
    halves = rng.integers(0, 2**63, (rows, 2))
    table = pa.table({
        "content_hash": [f"{a:016x}{b:016x}" for a, b in halves.tolist()],
        **{c: rng.integers(0, 2048, rows) for c in ("resize_w", "resize_h", "crop_top", "crop_left",
                                                     "bucket_w", "bucket_h")},
    })
    del halves
    params = vae_encode.Params()
    print(f"# keys: {rows:,} rows; load average {os.getloadavg()[0]:.1f}")
    t, c = time.perf_counter(), _cpu()
    fast = vae_encode.keys_of(table, params, "vae:bench")
    fast_cpu = _cpu() - c
    print(f"  from columns (item_keys): {time.perf_counter() - t:.1f} s wall, {fast_cpu:.1f} s CPU "
          f"= {fast_cpu / rows * 1e6:.2f} us a row")
    if reference:
        t, c = time.perf_counter(), _cpu()
        slow = [item_key(vae_encode.key_doc(r, params, "vae:bench")) for r in table.to_pylist()]
        slow_cpu = _cpu() - c
        print(f"  per row (to_pylist + key_doc + item_key): {time.perf_counter() - t:.1f} s wall, "
              f"{slow_cpu:.1f} s CPU = {slow_cpu / rows * 1e6:.2f} us a row; "
              f"ratio {slow_cpu / fast_cpu:.1f}x; identical: {slow == fast}")


# -- no-op run all -----------------------------------------------------------------------


def make_images(folder: Path, count: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
        (folder / f"{i:06d}.txt").write_text(f"a picture number {i}")


def _env(pycache: Path) -> dict:
    """The children's environment: this checkout first, and bytecode cached as an installed
    package has it (PYTHONDONTWRITEBYTECODE would recompile every sdxlpipe module per run)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONPYCACHEPREFIX": str(pycache)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def timed(cmd: list[str], cwd: Path, env: dict, runs: int = 3) -> tuple[float, float]:
    """(best wall seconds, best CPU seconds) of `runs` fresh processes, after one warm-up."""
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    best, best_cpu = float("inf"), float("inf")
    for _ in range(runs):
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
        best = min(best, time.perf_counter() - t)
        d = resource.getrusage(resource.RUSAGE_CHILDREN)
        best_cpu = min(best_cpu, d.ru_utime + d.ru_stime - c.ru_utime - c.ru_stime)
    return best, best_cpu


CONFIG = """
model = "tiny"
[[sources]]
path = "images"
[bucket]
resolution = 64
step = 32
min_side = 32
max_side = 128
[vae_encode]
workers = 0
[train]
max_steps = 1
batch_size = 4
[export]
output_dir = "output"
"""


def bench_noop(images: int, workdir: str | None) -> None:
    """workdir: a folder kept between runs (the first `run all` of 2k images takes ~15 min
    under load); made and filled when it has no sdxlpipe.toml yet."""
    cli = [sys.executable, "-m", "sdxlpipe"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir) if workdir else Path(tmp) / "work"
        env = _env(Path(tmp) / "pycache")
        if not (work / "sdxlpipe.toml").exists():
            make_images(work / "images", images)
            (work / "sdxlpipe.toml").write_text(CONFIG)
            t = time.perf_counter()
            first = subprocess.run([*cli, "run", "all"], cwd=work, capture_output=True, text=True, env=env)
            if first.returncode:
                print(first.stderr[-3000:])
                raise SystemExit("the first run failed")
            print(f"# noop: first run all {time.perf_counter() - t:.0f} s")
        count = sum(1 for p in (work / "images").iterdir() if p.suffix == ".png")
        print(f"# noop: {count} images in {work}; load average {os.getloadavg()[0]:.1f}")
        help_s, help_cpu = timed([*cli, "--help"], work, env)
        noop_s, noop_cpu = timed([*cli, "run", "all"], work, env)
        status_s, status_cpu = timed([*cli, "status"], work, env)
        # The same no-op on the normal path (the record ignored): the path taken before this record existed.
        slow = {**env, "SDXLPIPE_NO_RECORD": "1"}
        slow_s, slow_cpu = timed([*cli, "run", "all"], work, slow)
        slow_status_s, slow_status_cpu = timed([*cli, "status"], work, slow)
        print(f"  --help {help_s:.2f} s wall, {help_cpu:.2f} s CPU")
        print(f"  no-op run all, record ignored {slow_s:.2f} s wall = {slow_s / help_s:.2f}x; "
              f"{slow_cpu:.2f} s CPU = {slow_cpu / help_cpu:.2f}x")
        print(f"  status, record ignored {slow_status_s:.2f} s wall = {slow_status_s / help_s:.2f}x; "
              f"{slow_status_cpu:.2f} s CPU = {slow_status_cpu / help_cpu:.2f}x")
        print(f"  no-op run all {noop_s:.2f} s wall = {noop_s / help_s:.2f}x --help; "
              f"{noop_cpu:.2f} s CPU = {noop_cpu / help_cpu:.2f}x (target <= 2x)")
        print(f"  status {status_s:.2f} s wall = {status_s / help_s:.2f}x; "
              f"{status_cpu:.2f} s CPU = {status_cpu / help_cpu:.2f}x")


# -- end to end over N files, and incremental ------------------------------------------


E2E_CONFIG = """
model = "tiny"
[[sources]]
path = "images"
[bucket]
resolution = {px}
step = 32
min_side = 32
max_side = 128
[vae_encode]
workers = 0
batch_size = 64
[text_encode]
batch_size = 64
[train]
max_steps = 1
batch_size = 4
[export]
output_dir = "output"
"""
# The caption most images share: the text encoder has one text to encode, the changed ones one each.
CAPTION = "a square of one colour"


def _png(i: int, variant: int = 0, px: int = 32) -> bytes:
    """A distinct px-square image per i (its colour), ~100 bytes; `variant` changes its bytes."""
    import io

    from PIL import Image

    colour = (i % 256, (i // 256) % 256, (i // 65536) % 256 + 40 * variant)
    out = io.BytesIO()
    Image.new("RGB", (px, px), tuple(c % 256 for c in colour)).save(out, format="PNG")
    return out.getvalue()


def make_dataset(folder: Path, count: int, px: int) -> None:
    """`count` distinct PNGs, each with a caption file, 1,000 to a folder (as img2dataset lays them out)."""
    for i in range(count):
        sub = folder / f"{i // 1000:05d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:07d}.png").write_bytes(_png(i, px=px))
        (sub / f"{i:07d}.txt").write_text(CAPTION)


def make_npz(folder: Path, out: Path, px: int) -> int:
    """kohya's latent cache beside the dataset: one .npz per image (latents 4 x px/8 x px/8, original size, crop)."""
    import numpy as np

    n = 0
    latents = np.zeros((4, px // 8, px // 8), np.float32)
    for png in sorted(folder.rglob("*.png")):
        target = out / png.relative_to(folder).with_suffix(".npz")
        target.parent.mkdir(parents=True, exist_ok=True)
        np.savez(target, latents=latents, original_size=np.array([px, px]), crop_ltrb=np.array([0, 0, px, px]))
        n += 1
    return n


def stat_walk(root: str) -> int:
    """The floor: os.scandir + stat of every file, recursively, in plain Python."""
    n = 0
    with os.scandir(root) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                n += stat_walk(e.path)
            else:
                e.stat()
                n += 1
    return n


def kohya_check(root: Path, side: int) -> int:
    """kohya's startup check with cache_latents_to_disk (train_util.is_disk_cached_latents_is_expected):
    open each image's .npz, read its key list, and check the latents' shape."""
    import numpy as np

    ok = 0
    for path in sorted(root.rglob("*.npz")):
        with np.load(path) as npz:
            keys = npz.files
            ok += "latents" in keys and "original_size" in keys and npz["latents"].shape[1:3] == (side, side)
    return ok


def _timed_here(fn, *args) -> tuple[float, float, object]:
    """(wall, CPU, result) of fn in this process, after one warm-up call (page cache warm, as for the CLI)."""
    fn(*args)
    t, c = time.perf_counter(), _cpu()
    result = fn(*args)
    return time.perf_counter() - t, _cpu() - c, result


def _run_all(cli: list[str], work: Path, env: dict) -> tuple[float, float, dict]:
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run([*cli, "run", "all", "--json", "-q"], cwd=work, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    d = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        print(proc.stderr[-3000:])
        raise SystemExit("run all failed")
    return wall, d.ru_utime + d.ru_stime - c.ru_utime - c.ru_stime, json.loads(proc.stdout)


def bench_e2e(files: int, px: int, workdir: str | None, incremental: bool, noop: bool = True) -> None:
    """workdir: kept between runs (the first `run all` encodes every image)."""
    cli = [sys.executable, "-m", "sdxlpipe"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir) if workdir else Path(tmp) / "work"
        env = _env(Path(tmp) / "pycache")
        if not (work / "sdxlpipe.toml").exists():
            t = time.perf_counter()
            make_dataset(work / "images", files, px)
            print(f"# e2e: {files} images + {files} captions written in {time.perf_counter() - t:.0f} s")
            (work / "sdxlpipe.toml").write_text(E2E_CONFIG.format(px=px))
            wall, cpu, report = _run_all(cli, work, env)
            (work / "first_run.json").write_text(json.dumps({"wall": wall, "cpu": cpu, "report": report}))
            print(f"# e2e: first run all {wall:.0f} s wall, {cpu:.0f} s CPU: " + ", ".join(
                f"{n} {s['computed']} in {s['seconds']:.0f} s" for n, s in report["stages"].items()))
        if not (work / "npz").exists():
            t = time.perf_counter()
            n = make_npz(work / "images", work / "npz", px)
            print(f"# e2e: {n} kohya .npz files written in {time.perf_counter() - t:.0f} s")
        images = sum(1 for _ in (work / "images").rglob("*.png"))
        if not noop:
            bench_incremental(cli, work, env, images, px)
            return
        print(f"# e2e: {images} images (+ captions) in {work}; python {sys.version.split()[0]}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        # The record is written by a complete run; one more run makes sure there is one.
        subprocess.run([*cli, "run", "all", "-q"], cwd=work, env=env, check=True, capture_output=True)
        help_s, help_cpu = timed([*cli, "--help"], work, env)
        noop_s, noop_cpu = timed([*cli, "run", "all"], work, env)
        status_s, status_cpu = timed([*cli, "status"], work, env)
        slow_s, slow_cpu = timed([*cli, "status"], work, {**env, "SDXLPIPE_NO_RECORD": "1"}, runs=1)
        walk_s, walk_cpu, walked = _timed_here(stat_walk, str(work / "images"))
        npz_s, npz_cpu, checked = _timed_here(kohya_check, work / "npz", px // 8)
        print(f"  --help               {help_s:7.2f} s wall {help_cpu:7.2f} s CPU")
        print(f"  stat walk ({walked} files, in-process) {walk_s:7.2f} s wall {walk_cpu:7.2f} s CPU")
        print(f"  kohya npz check ({checked} files, in-process) {npz_s:7.2f} s wall {npz_cpu:7.2f} s CPU")
        print("  (ratios: wall / CPU)")
        for name, s, c in (("no-op run all", noop_s, noop_cpu), ("status", status_s, status_cpu),
                           ("status, record ignored", slow_s, slow_cpu)):
            print(f"  {name:22} {s:6.2f} s wall {c:6.2f} s CPU = {s / help_s:.2f}x / {c / help_cpu:.2f}x --help; "
                  f"(t - --help) = {(s - help_s) / walk_s:.2f}x / {(c - help_cpu) / walk_cpu:.2f}x the stat walk "
                  f"(target <= 3x); the npz check takes {npz_s / s:.1f}x / {npz_cpu / c:.1f}x t and "
                  f"{npz_s / max(s - help_s, 1e-3):.1f}x / {npz_cpu / max(c - help_cpu, 1e-3):.1f}x (t - --help) "
                  f"(target >= 50x)")
        if incremental:
            bench_incremental(cli, work, env, images, px)


def bench_incremental(cli: list[str], work: Path, env: dict, images: int, px: int) -> None:
    """Change 1% of the images (new bytes) and the captions of another 1%; run all; count what ran."""
    first = json.loads((work / "first_run.json").read_text())
    pngs = sorted((work / "images").rglob("*.png"))
    step = 100
    changed_images = pngs[0::step]
    changed_captions = pngs[step // 2::step]
    round_ = int(time.time())  # new bytes and new captions on every bench run
    for p in changed_images:
        p.write_bytes(_png(int(p.stem), variant=1 + round_ % 5, px=px))
    for p in changed_captions:
        p.with_suffix(".txt").write_text(f"{CAPTION}, changed {round_} {p.stem}")
    wall, cpu, report = _run_all(cli, work, env)
    print(f"# incremental: {len(changed_images)} images and {len(changed_captions)} captions changed of {images}")
    print(f"  run all {wall:.1f} s wall, {cpu:.1f} s CPU = {wall / first['wall']:.3f}x / {cpu / first['cpu']:.3f}x "
          f"the first full run ({first['wall']:.0f} s wall, {first['cpu']:.0f} s CPU)")
    for name, s in report["stages"].items():
        print(f"  {name:12} computed {s['computed']:>7} of {s['items']:>7}  {s['seconds']:.1f} s")
    print(f"  vae_encode computed == images changed: {report['stages']['vae_encode']['computed'] == len(changed_images)}; "
          f"text_encode computed == captions changed: "
          f"{report['stages']['text_encode']['computed'] == len(changed_captions)}")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child-index":
        share = float(sys.argv[sys.argv.index("--plan") + 1]) if "--plan" in sys.argv else None
        print(json.dumps(child_index(sys.argv[2], share)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["index", "keys", "noop", "e2e", "all"])
    ap.add_argument("--files", type=int, default=100_000, help="e2e: images on disk (each with a caption file)")
    ap.add_argument("--px", type=int, default=32, help="e2e: image side (32: the smallest bucket, cheapest to encode)")
    ap.add_argument("--no-incremental", action="store_true", help="e2e: skip the 1%% change")
    ap.add_argument("--incremental-only", action="store_true", help="e2e: only the 1%% change (on a filled --workdir)")
    ap.add_argument("--key-rows", type=int, default=1_000_000, help="keys: rows of the table")
    ap.add_argument("--no-reference", action="store_true",
                    help="keys: skip the per-row reference (needs ~1 GB per million rows)")
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--fragments", type=int, default=1000)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workdir", help="noop: keep the image folder, workspace and store here and reuse them")
    a = ap.parse_args()
    if a.part in ("index", "all"):
        bench_index(a.rows, a.fragments)
    if a.part in ("keys", "all"):
        bench_keys(a.key_rows, not a.no_reference)
    if a.part in ("noop", "all"):
        bench_noop(a.images, a.workdir)
    if a.part in ("e2e", "all"):
        bench_e2e(a.files, a.px, a.workdir, not a.no_incremental, noop=not a.incremental_only)


if __name__ == "__main__":
    main()
