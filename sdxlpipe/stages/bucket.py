"""Bucket: pick each image's aspect-ratio bucket and its resize and crop.

Recipe: make the bucket list (kohya's rule around `resolution`^2 pixels, or
the `sdxl` preset: the exact list SDXL was trained on) -> nearest aspect
ratio per image (with `no_upscale`, kohya's per-image bucket instead) ->
resize to cover the bucket, rounded as kohya rounds -> centre crop, or a
random crop seeded by the image's content hash. The real crop offset is recorded per row (kohya
records the offset of the image fitted inside the bucket instead), and the
train stage feeds it to SDXL's micro-conditioning with the original size.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

VERSION = 3  # 3: kohya's resize rounding and no_upscale resize (decision 56); its outputs enter vae_encode's keys
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
    # "sdxl": exactly the 40 buckets SDXL was trained on (paper, App. I); resolution/step/min/max are then unused.
    preset: Literal["", "sdxl"] = ""
    # Never enlarge an image: its bucket is its own size (area capped at resolution^2) floored to `step` (kohya's bucket_no_upscale).
    no_upscale: bool = False
    # "center" keeps the middle; "random" picks a seeded offset per image (recorded, so latents and conditioning agree).
    crop: Literal["center", "random"] = "center"
    # Seeds the random crops (with each image's content hash).
    seed: int = 0


def check(p: Params) -> list[tuple[str, str]]:
    problems = []
    if p.step <= 0 or p.step % 32:
        problems.append(("bucket.step", f"must be a positive multiple of 32 (VAE x8, then the UNet halves twice), not {p.step}"))
    if p.resolution < p.step:
        problems.append(("bucket.resolution", f"must be at least bucket.step ({p.step})"))
    if p.min_side > p.resolution or p.max_side < p.resolution:
        problems.append(("bucket.min_side", "need min_side <= resolution <= max_side"))
    return problems


def export_metadata(settings: dict, rows: pa.Table, ctx) -> dict[str, str]:
    """kohya's bucket fields for the rows these settings bucketed."""
    side = settings["resolution"]
    return {"ss_resolution": f"({side}, {side})", "ss_enable_bucket": "True",
            "ss_min_bucket_reso": str(settings["min_side"]), "ss_max_bucket_reso": str(settings["max_side"]),
            "ss_bucket_no_upscale": str(settings["no_upscale"]), "modelspec.resolution": f"{side}x{side}"}


# The bucket list of the SDXL paper (Podell et al. 2023, App. I). The paper
# prints rows as height, width (aspect ratio = h/w, 0.25 for 512 x 2048); the
# rows below are copied in that order and turned into (width, height). The
# same 40 rows are reproduced in neggles/neurosis
# (src/neurosis/dataset/aspect/lists.py, SDXLBucketList), which reads them
# as (width, height). The list is not symmetric: 1344 x 704 (w x h) is in it,
# 704 x 1344 is not.
_SDXL_PAPER_HEIGHT_WIDTH = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664),
    (640, 1600), (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280),
    (832, 1216), (832, 1152), (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024),
    (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832), (1216, 832), (1280, 768),
    (1344, 768), (1408, 704), (1472, 704), (1536, 640), (1600, 640), (1664, 576), (1728, 576),
    (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)
SDXL_BUCKETS = tuple((w, h) for h, w in _SDXL_PAPER_HEIGHT_WIDTH)
PRESETS = {"sdxl": SDXL_BUCKETS}


def bucket_list(p: Params) -> list[tuple[int, int]]:
    if p.preset:
        return sorted(PRESETS[p.preset], key=lambda b: (b[0] / b[1], b[0]))
    return make_buckets(p.resolution, p.step, p.min_side, p.max_side)


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


def choose(width: int, height: int, buckets: list[tuple[int, int]],
           crop_rng: random.Random | None = None) -> tuple[int, int, int, int, int, int]:
    """(bucket_w, bucket_h, resize_w, resize_h, crop_top, crop_left) for one image."""
    ratio = math.log(width / height)
    bw, bh = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))
    return cover(width, height, bw, bh, crop_rng)


def cover(width: int, height: int, bw: int, bh: int, crop_rng: random.Random | None = None):
    """Resize (width, height) to cover the bucket, then crop: centre, or random with `crop_rng`.

    kohya's rule (library/train_util.py, BucketManager.select_bucket): the side the aspect ratio says fits is
    scaled to the bucket's side, the other is rounded half up (never below the bucket's: it is the longer one);
    the centre crop is trim // 2, as its trim_and_resize_if_required (docs/decisions.md 56).
    """
    scale = bh / height if width / height > bw / bh else bw / width
    return _crop(bw, bh, int(width * scale + 0.5), int(height * scale + 0.5), crop_rng)


def _crop(bw: int, bh: int, rw: int, rh: int, crop_rng: random.Random | None):
    if crop_rng is None:
        return bw, bh, rw, rh, (rh - bh) // 2, (rw - bw) // 2
    return bw, bh, rw, rh, crop_rng.randint(0, rh - bh), crop_rng.randint(0, rw - bw)


def no_upscale(width: int, height: int, resolution: int, step: int, crop_rng: random.Random | None = None):
    """kohya's bucket_no_upscale (BucketManager.select_bucket): an image within resolution^2 pixels keeps its size;
    a larger one is resized to that area, one side on the step; the bucket is the resized size floored to the step,
    and the overflow is cropped. Returns what `cover` returns."""
    max_area = resolution * resolution
    aspect = width / height

    def round_to_step(x: float) -> int:
        x = int(x + 0.5)
        return max(step, x - x % step)  # the max only guards images thinner than a step (kohya divides by zero)

    if width * height > max_area:
        rw = math.sqrt(max_area * aspect)
        rh = max_area / rw
        bw_r = round_to_step(rw)
        ar_w = bw_r / round_to_step(bw_r / aspect)
        bh_r = round_to_step(rh)
        ar_h = round_to_step(bh_r * aspect) / bh_r
        size = (bw_r, int(bw_r / aspect + 0.5)) if abs(ar_w - aspect) < abs(ar_h - aspect) else (int(bh_r * aspect + 0.5), bh_r)
    else:
        size = (width, height)
    bw, bh = size[0] - size[0] % step, size[1] - size[1] % step
    if bw < step or bh < step:  # thinner than a step: the smallest bucket, covered by resizing up
        return cover(width, height, max(step, bw), max(step, bh), crop_rng)
    return _crop(bw, bh, size[0], size[1], crop_rng)


def run(table: pa.Table, params: Params, ctx) -> pa.Table:
    buckets = bucket_list(params)
    widths, heights = table.column("width").to_pylist(), table.column("height").to_pylist()
    hashes = table.column("content_hash").to_pylist()
    chosen = []
    for w, h, digest in zip(widths, heights, hashes):
        rng = random.Random(f"{params.seed}/{digest}") if params.crop == "random" else None
        if params.no_upscale and not params.preset:
            chosen.append(no_upscale(w, h, params.resolution, params.step, rng))
        else:
            chosen.append(choose(w, h, buckets, rng))
    for i, name in enumerate(OUTPUT_COLUMNS):
        table = table.append_column(name, pa.array([c[i] for c in chosen], pa.int32()))
    return table
