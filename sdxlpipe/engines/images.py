"""Decode one image as the VAE will see it: torch-free, so worker processes start fast.

Runs in the decode workers of the local engine and inside Ray actors: it
imports only PIL and numpy. Returns uint8 arrays (a quarter of float32's
bytes on the way back from a worker process).
"""

from __future__ import annotations

import numpy as np

MASK_SUFFIXES = (".png", ".webp", ".jpg", ".jpeg", ".bmp")


def open_image(source: str):
    """The source as a PIL image; datasets.open_source_image (images in tars) when it exists."""
    try:
        from sdxlpipe.datasets import open_source_image  # the ingest side's opener, once it exists
    except ImportError:
        from PIL import Image

        return Image.open(source)
    return open_source_image(source)


def _fit(im, job: dict):
    from PIL import Image

    im = im.resize((job["resize_w"], job["resize_h"]), Image.Resampling.LANCZOS)
    left, top = job["crop_left"], job["crop_top"]
    return im.crop((left, top, left + job["bucket_w"], top + job["bucket_h"]))


def load_job(job: dict) -> dict:
    """{"pixels": uint8 HxWx3, "mask": float32 (H/f)x(W/f) or None} or {"error": why}.

    job: source, resize_w/h, crop_top/left, bucket_w/h, mask ("none", "alpha" or a
    mask file path, "" for no file) and latent_factor (the VAE's downsampling).
    """
    from PIL import Image, ImageOps

    try:
        with open_image(job["source"]) as raw:
            im = ImageOps.exif_transpose(raw)
            alpha = None
            if job.get("mask") == "alpha":
                alpha = im.convert("RGBA").getchannel("A")
            pixels = np.array(_fit(im.convert("RGB"), job), dtype=np.uint8)  # a writable copy for torch
        mask_image = alpha
        if job.get("mask") not in (None, "none", "alpha"):
            if job["mask"]:
                with Image.open(job["mask"]) as m:
                    mask_image = ImageOps.exif_transpose(m).convert("L")
                    mask_image.load()
            else:
                mask_image = Image.new("L", pixels.shape[1::-1], 255)  # no mask file: the whole image counts
        mask = None
        if mask_image is not None:
            fitted = _fit(mask_image, job) if mask_image.size != pixels.shape[1::-1] else mask_image
            f = job["latent_factor"]
            small = fitted.resize((job["bucket_w"] // f, job["bucket_h"] // f), Image.Resampling.BOX)
            mask = np.asarray(small, dtype=np.float32) / 255.0
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return {"error": f"could not be read for encoding ({type(e).__name__}: {e})"}
    return {"pixels": pixels, "mask": mask}


def find_mask(folder: str, source: str) -> str:
    """The mask file for an image: same file stem in the mask folder; "" when there is none."""
    from pathlib import Path

    stem = Path(source).stem
    for suffix in MASK_SUFFIXES:
        candidate = Path(folder) / f"{stem}{suffix}"
        if candidate.is_file():
            return str(candidate)
    return ""
