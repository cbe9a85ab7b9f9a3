"""Does peak memory while encoding grow with the dataset? `run encode` at 1k and 10k images.

    python bench/encode_memory.py [--counts 1000 10000] [--workers 2]

Each size runs `sdxlpipe run encode` in a fresh process on a fresh folder of
small images (tiny model, 64 px buckets, --images-per-shard 64 so that a
bucket is many chunks, as 1024 px latents are: each chunk refreshes the
index and commits a shard, which must not grow with the store) and reports the peak RSS of the
encoder process and of its decode workers (ru_maxrss). The ratio between the
sizes is what matters: the tables grow by a few hundred bytes per row, the
pixels and latents in flight do not grow at all.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, resource, sys, time
from sdxlpipe.config import load_config
from sdxlpipe.pipeline.runner import run_pipeline
began = time.perf_counter()
report = run_pipeline(load_config(sys.argv[1]), "encode")
print(json.dumps({
    "seconds": time.perf_counter() - began,
    "computed": report["stages"]["vae_encode"]["computed"],
    "self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
}))
"""


def make(folder: Path, count: int, workers: int, per_shard: int) -> Path:
    import numpy as np
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(count)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (96, 64 + 32 * (i % 2), 3), dtype=np.uint8)).save(images / f"{i:06d}.png")
        (images / f"{i:06d}.txt").write_text(f"sample {i % 50}\n")
    config = folder / "sdxlpipe.toml"
    config.write_text(f'model = "tiny"\n[[sources]]\npath = "images"\n[bucket]\nresolution = 64\nstep = 32\n'
                      f"min_side = 32\nmax_side = 128\n[vae_encode]\nbatch_size = 16\nworkers = {workers}\n"
                      f"images_per_shard = {per_shard}\n")
    return config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--workers", type=int, default=2)
    # 64: at 64 px a 256 MiB shard would hold every image, hiding the per-chunk costs.
    ap.add_argument("--images-per-shard", type=int, default=64)
    args = ap.parse_args()
    rows = []
    for count in args.counts:
        with tempfile.TemporaryDirectory() as tmp:
            began = time.perf_counter()
            config = make(Path(tmp), count, args.workers, args.images_per_shard)
            made = time.perf_counter() - began
            out = subprocess.run([sys.executable, "-c", PROBE, str(config)], capture_output=True, text=True,
                                 cwd=ROOT, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((count, result))
            print(f"{count:>7} images: encode {result['seconds']:6.1f}s ({result['computed']} latents; "
                  f"images made in {made:.1f}s), peak RSS encoder {result['self_mb']:7.1f} MB, "
                  f"decode workers {result['children_mb']:6.1f} MB", flush=True)
    (base_n, base), *rest = rows
    for n, r in rest:
        print(f"{n}/{base_n} images ({n / base_n:.0f}x data): peak RSS encoder x{r['self_mb'] / base['self_mb']:.3f}, "
              f"decode workers x{r['children_mb'] / max(base['children_mb'], 1e-9):.3f}")


if __name__ == "__main__":
    main()
