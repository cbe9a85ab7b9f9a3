"""Decode one image as the VAE will see it: torch-free, so worker processes start fast.

Runs in the decode workers of the local engine and inside Ray actors: it
imports only PIL and numpy. Returns uint8 arrays (a quarter of float32's
bytes on the way back from a worker process).
"""

from __future__ import annotations

import numpy as np

# Bump when a change here alters the pixels or mask the VAE gets (resize filter, crop,
# mask downsampling): it enters every vae_encode key, so cached latents are recomputed.
VERSION = 1
MASK_SUFFIXES = (".png", ".webp", ".jpg", ".jpeg", ".bmp")


def open_image(source: str, want_alpha: bool = False):
    """(upright 8-bit RGB image, its alpha as "L" or None).

    The ingest side's opener (sdxlpipe.datasets: images in tars, odd modes,
    transparency laid on its background) when it exists, else plain PIL.
    """
    from PIL import Image, ImageOps

    try:
        from sdxlpipe.datasets import open_source_alpha, open_source_image
    except ImportError:
        with Image.open(source) as raw:
            im = ImageOps.exif_transpose(raw)
            alpha = im.convert("RGBA").getchannel("A") if want_alpha else None
            return im.convert("RGB"), alpha
    alpha = open_source_alpha(source) if want_alpha else None
    return open_source_image(source).convert("RGB"), alpha


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
        im, alpha = open_image(job["source"], want_alpha=job.get("mask") == "alpha")
        if job.get("mask") == "alpha" and alpha is None:
            alpha = Image.new("L", im.size, 255)  # an opaque image: every pixel counts
        pixels = np.array(_fit(im, job), dtype=np.uint8)  # a writable copy for torch
        mask_image = alpha
        if job.get("mask") not in (None, "none", "alpha"):
            if job["mask"]:
                with Image.open(job["mask"]) as m:
                    mask_image = ImageOps.exif_transpose(m).convert("L")
                    mask_image.load()
            else:
                mask_image = Image.new("L", im.size, 255)  # no mask file: the whole image counts
        mask = None
        if mask_image is not None:
            if mask_image.size != im.size:  # a mask file drawn at another resolution
                mask_image = mask_image.resize(im.size, Image.Resampling.BILINEAR)
            fitted = _fit(mask_image, job)
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
