"""A training batch's choices and conditioning: which cached payloads a batch uses, and its micro-conditioning.

`pick` makes a batch's seeded per-sample choices (flip, caption variant,
caption dropout) and so names the store items it needs; `conditioning` gives
the batch's SDXL micro-conditioning for those choices; `to_device` puts a
batch's payload tensors on the training device in fp32 (`as_float` on a CPU). `training/stream.py` reads the payloads `pick`
names straight into the batch (tests/training/reference_batches.py builds
the same batch from decoded payloads, the reference it is checked against).
"""

from __future__ import annotations

import numpy as np
import torch

from sdxlpipe.models.sdxl import add_time_ids
from sdxlpipe.training.data import choice, coin


def pick(rows: list[dict], members: list[int], p, epoch: int, index: int, fixed: bool) -> list[dict]:
    """Per sample: the latent key, the text key (or caption, when the loop encodes text), and the flip."""
    picks = []
    for pos, (row, i) in enumerate(zip(rows, members)):
        flip = bool(row.get("latent_flip_key")) and not fixed and coin(0.5, p.seed, "flip", index, pos)
        dropped = not fixed and coin(p.caption_dropout, p.seed, "drop", index, pos)
        text_key = caption = None
        if p.train_text_encoder:
            caption = choice(row.get("caption_variants") or [row["caption"]], p.seed, "text", epoch, i)
            caption = "" if dropped else caption
        else:
            text_key = choice(row.get("text_variant_keys") or [row["text_key"]], p.seed, "text", epoch, i)
            if dropped and row.get("empty_text_key"):
                text_key = row["empty_text_key"]
        picks.append({"latent_key": row["latent_flip_key"] if flip else row["latent_key"], "flip": flip,
                      "text_key": text_key, "caption": caption})
    return picks


FLOAT_FIELDS = ("mean", "std", "embeds", "pooled", "mask")


def conditioning(rows: list[dict], picks: list[dict]) -> dict:
    """The batch's captions (when the loop encodes text), SDXL micro-conditioning and regularisation flags."""
    captions, time_ids = [], []
    for row, chosen in zip(rows, picks):
        if chosen["caption"] is not None:
            captions.append(chosen["caption"])
        crop_left = row["crop_left"]
        if chosen["flip"] and row.get("resize_w"):
            # The crop seen from the other side of the flipped image.
            crop_left = row["resize_w"] - row["bucket_w"] - crop_left
        time_ids.append(add_time_ids((row["height"], row["width"]), (row["crop_top"], crop_left),
                                     (row["bucket_h"], row["bucket_w"])))
    # Through numpy: a few us a batch, where torch.tensor of nested lists took ~20 (the same values).
    return {"captions": captions, "time_ids": torch.from_numpy(np.array(time_ids, dtype=np.float32).reshape(-1, 6)),
            "is_reg": torch.from_numpy(np.array([bool(row.get("is_reg")) for row in rows], dtype=bool))}


def as_float(batch: dict) -> dict:
    """The batch with its payload tensors in fp32, what the loss is computed in (exact from fp16).

    Streamed batches arrive in the stored dtype (half the bytes to copy, and to a GPU); the
    training loop calls this on each.
    """
    # Always a copy (an fp32 payload too): the loop hands the read buffers back to the feed right after.
    return {k: v.to(torch.float32, copy=True) if k in FLOAT_FIELDS and v is not None else v for k, v in batch.items()}


def to_device(batch: dict, device) -> dict:
    """The batch with its payload tensors on `device` in fp32: on a CUDA device copied there in the stored dtype
    (fp16: half the bytes of fp32 over the bus, asynchronously from the pinned buffers) and converted there, so
    the CPU converts nothing; elsewhere `as_float` (the same values: fp16 and bf16 to fp32 is exact).

    On CUDA the copies may still be running when this returns: the caller must not refill the read buffers
    before they are done (the loop hands them back to the feed with an event recorded after them).
    """
    if torch.device(device).type != "cuda":
        return as_float(batch)
    return {k: v.to(device, non_blocking=True).to(torch.float32) if k in FLOAT_FIELDS and v is not None else v
            for k, v in batch.items()}
