"""A training batch's tensors: which cached payloads a batch uses, and the batch built from them.

`pick` makes a batch's seeded per-sample choices (flip, caption variant,
caption dropout) and so names the store items it needs; `assemble` builds
the batch's tensors from those payloads with SDXL's micro-conditioning.
`training/stream.py` reads a batch's payloads per batch and calls both;
`load_cached` reads every payload of the run at once: the in-memory path,
kept as the reference the streamed batches are tested against.
"""

from __future__ import annotations

import numpy as np
import torch

from sdxlpipe.cache_format import CacheDamaged, decode_tensors
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


def assemble(rows: list[dict], members: list[int], latents: dict, texts: dict, p, epoch: int, index: int,
             fixed: bool) -> dict:
    """The batch's tensors (CPU, payloads in fp32) and choices: flip, caption variant, caption dropout,
    micro-conditioning.

    `latents` and `texts` map item keys to decoded payloads; they need hold only the keys `pick` names.
    `training/stream.py` builds the same batch from the same `pick` and `conditioning`, reading each
    payload straight into its batch slot.
    """
    picks = pick(rows, members, p, epoch, index, fixed)
    lat = [latents[c["latent_key"]] for c in picks]
    txt = [texts[c["text_key"]] for c in picks if c["caption"] is None]
    mask = None
    if p.masked_loss:
        ones = torch.ones_like(lat[0]["mean"][:1])
        mask = torch.stack([e["mask"].reshape(ones.shape) if e.get("mask") is not None else ones for e in lat])
    batch = {
        "mean": torch.stack([e["mean"] for e in lat]), "std": torch.stack([e["std"] for e in lat]),
        "scale": lat[0]["scaling_factor"], "shift": lat[0]["shift_factor"],
        "embeds": torch.stack([t["prompt_embeds"] for t in txt]) if txt else None,
        "pooled": torch.stack([t["pooled_prompt_embeds"] for t in txt]) if txt else None,
        "mask": mask, **conditioning(rows, picks),
    }
    return as_float(batch)


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


def decode_latent(data: bytes) -> dict:
    """A latent payload as tensors plus the VAE's scaling and shift factors."""
    tensors, meta = decode_tensors(data, "pt")
    return {**tensors, "scaling_factor": float(meta.get("scaling_factor", "1.0")),
            "shift_factor": float(meta.get("shift_factor", "0.0") or 0.0)}


def decode_text(data: bytes) -> dict:
    return decode_tensors(data, "pt")[0]


def load_cached(rows: list[dict], ctx, texts: bool = True) -> tuple[dict, dict]:
    """Every latent (flipped ones too) and text payload (variants and the empty caption too), decoded once.

    Memory grows with the dataset (~566 KiB per SDXL sample); training streams instead
    (`training/stream.py`). Kept as the reference the streamed batches are checked against.
    """
    latent_keys = {r["latent_key"] for r in rows} | {r["latent_flip_key"] for r in rows if r.get("latent_flip_key")}
    text_keys = {r["text_key"] for r in rows} | {r["empty_text_key"] for r in rows if r.get("empty_text_key")}
    text_keys |= {k for r in rows for k in (r.get("text_variant_keys") or [])}
    if not texts:
        text_keys = set()
    latents = {key: decode_latent(data)
               for key, data in ctx.store.read_many("vae_encode", sorted(latent_keys)) if data is not None}
    text_payloads = {key: decode_text(data)
                     for key, data in ctx.store.read_many("text_encode", sorted(text_keys)) if data is not None}
    lost = {"vae_encode": latent_keys - latents.keys(), "text_encode": text_keys - text_payloads.keys()}
    if any(lost.values()):
        # The runner recomputes these items and runs the train stage again.
        raise CacheDamaged({s: k for s, k in lost.items() if k},
                           f"{sum(map(len, lost.values()))} cached item(s) in {ctx.store.url} are missing or failed their checksum")
    return latents, text_payloads
