"""The reference batch: every payload decoded in memory, then stacked; what streamed batches must equal.

The all-in-RAM path training used before it streamed from the store (memory
grows with the dataset, ~566 KiB per SDXL sample). `training/stream.py`
builds each batch from the same `batches.pick` and `batches.conditioning`,
reading each payload straight into its batch slot; the tests check the two
agree, and bench/train_read.py measures this path's memory beside it.
"""

from __future__ import annotations

import torch

from sdxlpipe.cache_format import CacheDamaged, decode_tensors
from sdxlpipe.training.batches import as_float, conditioning, pick


def assemble(rows: list[dict], members: list[int], latents: dict, texts: dict, p, epoch: int, index: int,
             fixed: bool) -> dict:
    """The batch's tensors (CPU, payloads in fp32) and choices: flip, caption variant, caption dropout,
    micro-conditioning.

    `latents` and `texts` map item keys to decoded payloads; they need hold only the keys `pick` names.
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


def decode_latent(data: bytes) -> dict:
    """A latent payload as tensors plus the VAE's scaling and shift factors."""
    tensors, meta = decode_tensors(data, "pt")
    return {**tensors, "scaling_factor": float(meta.get("scaling_factor", "1.0")),
            "shift_factor": float(meta.get("shift_factor", "0.0") or 0.0)}


def decode_text(data: bytes) -> dict:
    return decode_tensors(data, "pt")[0]


def load_cached(rows: list[dict], ctx, texts: bool = True) -> tuple[dict, dict]:
    """Every latent (flipped ones too) and text payload (variants and the empty caption too), decoded once.

    Memory grows with the dataset (~566 KiB per SDXL sample); training streams instead.
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
