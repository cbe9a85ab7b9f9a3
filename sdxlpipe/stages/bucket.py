"""Bucket: pick each image's aspect-ratio bucket and its resize and crop.

Recipe: make the bucket list (kohya's rule around `resolution`^2 pixels)
-> nearest aspect ratio per image -> resize to cover the bucket -> centre
crop. The real crop offset is recorded per row (kohya records the offset of
the image fitted inside the bucket instead), and the train stage feeds it
to SDXL's micro-conditioning with the original size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa

VERSION = 1
OUTPUT_COLUMNS = ("bucket_w", "bucket_h", "resize_w", "resize_h", "crop_top", "crop_left")


@dataclass(frozen=True)
class Params:
    # Side of the square whose area every bucket approximates; SDXL was trained at 1024.
    resolution: int = 1024
    # Bucket sides are multiples of this; 64 keeps latents a multiple of 8 (SDXL's VAE is x8).
    step: int = 64
    # Narrowest side a bucket may have (kohya's min_bucket_reso default).
    min_side: int = 256
    # Widest side a bucket may have (kohya's max_bucket_reso default).
    max_side: int = 2048


def check(p: Params) -> list[tuple[str, str]]:
    problems = []
    if p.step <= 0 or p.step % 8:
        problems.append(("bucket.step", f"must be a positive multiple of 8 (the VAE downsamples x8), not {p.step}"))
    if p.resolution < p.step:
        problems.append(("bucket.resolution", f"must be at least bucket.step ({p.step})"))
    if p.min_side > p.resolution or p.max_side < p.resolution:
        problems.append(("bucket.min_side", "need min_side <= resolution <= max_side"))
    return problems


def make_buckets(resolution: int, step: int = 64, min_side: int = 256, max_side: int = 2048) -> list[tuple[int, int]]:
    """kohya's make_bucket_resolutions: the square, then each width by `step`
    with the tallest height that keeps the area, in both orientations."""
    min_side = min(min_side, resolution)
    area = resolution * resolution
    side = (resolution // step) * step
    buckets = {(side, side)}
    width = max(min_side, step)
    width = math.ceil(width / step) * step
    while width <= max_side:
        height = min(max_side, (area // width // step) * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def choose(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int, int, int, int, int]:
    """(bucket_w, bucket_h, resize_w, resize_h, crop_top, crop_left) for one image."""
    ratio = math.log(width / height)
    bw, bh = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))
    scale = max(bw / width, bh / height)
    # Round up so the resized image always covers the bucket.
    rw, rh = max(bw, math.ceil(width * scale - 1e-6)), max(bh, math.ceil(height * scale - 1e-6))
    return bw, bh, rw, rh, (rh - bh) // 2, (rw - bw) // 2


def run(table: pa.Table, params: Params, ctx) -> pa.Table:
    buckets = make_buckets(params.resolution, params.step, params.min_side, params.max_side)
    widths, heights = table.column("width").to_pylist(), table.column("height").to_pylist()
    chosen = [choose(w, h, buckets) for w, h in zip(widths, heights)]
    for i, name in enumerate(OUTPUT_COLUMNS):
        table = table.append_column(name, pa.array([c[i] for c in chosen], pa.int32()))
    return table
