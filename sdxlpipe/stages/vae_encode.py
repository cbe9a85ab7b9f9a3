"""VAE encode: each image's latent distribution, cached in the store.

Recipe: one key per row from the image bytes, its resize and crop and the
VAE's weights -> the keys the store lacks -> batches from one bucket ->
decode, resize, crop -> encode -> store mean and std in fp16 -> a
`latent_key` column. Non-finite latents (SDXL's VAE in fp16) are encoded
again in fp32; a NaN is never stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

from sdxlpipe.pipeline.keys import item_key
from sdxlpipe.pipeline.plan import plan_items

VERSION = 1
OUTPUT_COLUMNS = ("latent_key",)
FIELD = "latent.safetensors"


@dataclass(frozen=True)
class Params:
    # Images per VAE call; 8 fits a 24 GB GPU at 1024^2 in fp16 with room to spare.
    batch_size: int = 8
    # fp32 is exact; fp16/bf16 halve the VAE's memory (NaNs are re-encoded in fp32).
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


def check(p: Params) -> list[tuple[str, str]]:
    return [("vae_encode.batch_size", "must be >= 1")] if p.batch_size < 1 else []


def key_doc(row: dict, params: Params, vae_fingerprint: str) -> dict:
    return {
        "stage": "vae_encode", "version": VERSION, "content_hash": row["content_hash"],
        "resize": [row["resize_w"], row["resize_h"]], "crop": [row["crop_top"], row["crop_left"]],
        "size": [row["bucket_w"], row["bucket_h"]], "dtype": params.dtype, "vae": vae_fingerprint,
    }


def run(table: pa.Table, params: Params, ctx) -> pa.Table:
    rows = table.to_pylist()
    vae_fp = ctx.models.fingerprints()["vae"]
    keys = [item_key(key_doc(r, params, vae_fp)) for r in rows]
    todo = set(plan_items(ctx, keys))
    if todo and not ctx.dry_run:
        first_row = {}
        for key, row in zip(keys, rows):
            if key in todo:
                first_row.setdefault(key, row)
        failed = _encode(list(first_row.items()), params, ctx)
        ctx.stats[ctx.stage].failed = len(failed)
        ctx.stats[ctx.stage].computed -= len(failed)
        if failed:
            keep = [i for i, k in enumerate(keys) if k not in failed]
            table, keys = table.take(keep), [keys[i] for i in keep]
    return table.append_column("latent_key", pa.array(keys, pa.string()))


def _encode(items: list[tuple[str, dict]], params: Params, ctx) -> set[str]:
    """Encode and store `items` batch by batch; return the keys that failed."""
    import torch

    from sdxlpipe.cache_format import encode_tensors

    vae = ctx.models.vae(params.dtype)
    failed: set[str] = set()
    by_bucket: dict[tuple[int, int], list] = {}
    for key, row in items:
        by_bucket.setdefault((row["bucket_w"], row["bucket_h"]), []).append((key, row))
    with ctx.store.writer("vae_encode") as writer, ctx.reporter.track("vae_encode", len(items)) as advance:
        for bucket in sorted(by_bucket):
            group = by_bucket[bucket]
            for start in range(0, len(group), params.batch_size):
                batch = []
                for key, row in group[start:start + params.batch_size]:
                    try:
                        batch.append((key, row, load_pixels(row)))
                    except OSError as e:
                        ctx.reject(row["source"], f"could not be read for encoding ({e})")
                        failed.add(key)
                if not batch:
                    continue
                pixels = torch.stack([b[2] for b in batch])
                mean, std = _encode_batch(vae, pixels, ctx)
                for i, (key, row, _) in enumerate(batch):
                    payload = encode_tensors(
                        {"mean": mean[i].to(torch.float16).contiguous(), "std": std[i].to(torch.float16).contiguous()},
                        {"scaling_factor": str(vae.config.scaling_factor),
                         "shift_factor": str(getattr(vae.config, "shift_factor", None) or 0.0)},
                    )
                    writer.add(key, FIELD, payload)
                advance(len(batch))
    return failed


def _encode_batch(vae, pixels, ctx):
    import torch

    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        bad = ~(torch.isfinite(mean).flatten(1).all(1) & torch.isfinite(std).flatten(1).all(1))
        if bad.any():
            ctx.log.warning("%d latent(s) not finite in %s: encoding them again in float32", int(bad.sum()), vae.dtype)
            vae32 = ctx.models.vae("float32")
            again = vae32.encode(pixels[bad].to(vae32.device, torch.float32)).latent_dist
            mean[bad], std[bad] = again.mean.float(), again.std.float()
    return mean.cpu(), std.cpu()


def load_pixels(row: dict):
    """The image as the VAE sees it: RGB, EXIF-upright, resized to cover, cropped, in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(row["source"]) as im:
        im = ImageOps.exif_transpose(im)
        im = im.convert("RGB")
        im = im.resize((row["resize_w"], row["resize_h"]), Image.Resampling.LANCZOS)
        left, top = row["crop_left"], row["crop_top"]
        im = im.crop((left, top, left + row["bucket_w"], top + row["bucket_h"]))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
