"""Is the VAE ever waiting for the CPU? Decode+resize speed against encoder speed, on tiny.

    python bench/encode.py [--images 192] [--workers 0 1 2] [--batch 8] [--size 512x384] [--resolution 128]

Makes JPEGs larger than the bucket (so decode and resize are real work),
then measures in this one run:
  decode   images/s of decode+resize+crop in one process (the baseline)
  encoder  images/s of the tiny VAE on already decoded batches
  pipeline for each --workers: images/s end to end through the local engine,
           and the share of wall time the encoder sat idle waiting for images
Ratios are against the baseline measured here, never against a number from
another machine.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_images(folder: Path, count: int, w: int, h: int) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        base = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        im = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
        path = folder / f"{i:05d}.jpg"
        im.save(path, quality=90)
        paths.append(str(path))
    return paths


def jobs_for(paths: list[str], w: int, h: int, resolution: int) -> list[dict]:
    # Cover-resize to the bucket and centre-crop, as the bucket stage would.
    bw, bh = resolution, resolution * h // w // 32 * 32 or resolution
    scale = max(bw / w, bh / h)
    rw, rh = round(w * scale), round(h * scale)
    return [{"key": f"{i:032x}", "flip_key": "", "chunk_key": f"{i:032x}", "source": p,
             "resize_w": rw, "resize_h": rh, "crop_top": (rh - bh) // 2, "crop_left": (rw - bw) // 2,
             "bucket_w": bw, "bucket_h": bh, "mask": "none", "latent_factor": 8}
            for i, p in enumerate(paths)]


class TimedWorker:
    """Wraps the VAE worker and adds up the time the encoder is busy."""

    def __init__(self, worker):
        self.worker = worker
        self.busy = 0.0

    def __call__(self, jobs, prepared):
        began = time.perf_counter()
        out = self.worker(jobs, prepared)
        self.busy += time.perf_counter() - began
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", default="512x384", help="source image size WxH")
    ap.add_argument("--resolution", type=int, default=128, help="bucket side (tiny trains at 128)")
    args = ap.parse_args()
    w, h = (int(x) for x in args.size.split("x"))

    import torch

    from sdxlpipe.engines.images import load_job
    from sdxlpipe.engines.local import LocalEngine
    from sdxlpipe.models.loading import load_vae
    from sdxlpipe.stages.vae_encode import VaeWorker

    vae = load_vae("tiny")
    load = functools.lru_cache(None)(lambda dtype: vae)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), args.images, w, h)
        jobs = jobs_for(paths, w, h, args.resolution)

        began = time.perf_counter()
        prepared = [load_job(j) for j in jobs]
        decode_rate = len(jobs) / (time.perf_counter() - began)

        worker = VaeWorker(load, "float32")
        worker(jobs[: args.batch], prepared[: args.batch])  # warm-up
        began = time.perf_counter()
        for i in range(0, len(jobs), args.batch):
            worker(jobs[i:i + args.batch], prepared[i:i + args.batch])
        encode_rate = len(jobs) / (time.perf_counter() - began)

        print(f"torch threads {torch.get_num_threads()}, {args.images} images {w}x{h} -> "
              f"{jobs[0]['bucket_w']}x{jobs[0]['bucket_h']}, batch {args.batch}")
        print(f"decode+resize, 1 process : {decode_rate:8.1f} images/s  (baseline)")
        print(f"VAE encoder alone        : {encode_rate:8.1f} images/s  ({encode_rate / decode_rate:.2f}x decode)")
        for workers in args.workers:
            engine = LocalEngine(workers)
            timed = TimedWorker(VaeWorker(load, "float32"))
            list(engine.run(jobs[: args.batch * 2], load_job, lambda: timed, args.batch))  # start the pool
            timed.busy = 0.0
            began = time.perf_counter()
            for _ in engine.run(jobs, load_job, lambda: timed, args.batch):
                pass
            wall = time.perf_counter() - began
            engine.close()
            rate = len(jobs) / wall
            print(f"pipeline, {workers} decode worker(s): {rate:8.1f} images/s  ({rate / decode_rate:.2f}x decode "
                  f"baseline, {rate / encode_rate:.2f}x encoder alone), encoder idle {1 - timed.busy / wall:5.1%}")


if __name__ == "__main__":
    main()
