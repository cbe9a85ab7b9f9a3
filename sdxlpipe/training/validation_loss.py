"""The validation loss: the model's loss on held-out items (`training.holdout`), comparable across steps and runs.

Every validation measures the same thing: each held-out item at the same
`TIMESTEPS`, with the same noise (seeded by `train.validation_seed`, the item
and the timestep, never by `train.seed` or the batch it lands in), from the
latent distribution's mean (no sampled latent), with its own caption (no
variant, no dropout, no flip). So the number moves only when the weights do:
it falls while the model learns what generalises and rises when it starts to
memorise the training items, which is when to stop (the lowest one is named
at the end of the run). As kohya's validation, the loss is measured at fixed
timesteps with fixed noise rather than with training's random draws.

The loss is the run's own element-wise loss (`loss_type`, Huber's c schedule,
the mask with `masked_loss`) on its prediction target, averaged over items and
timesteps, without the per-sample weights (min-SNR, debiased estimation,
prior-preservation): they reweight timesteps the validation already fixes.
"""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import torch

from sdxlpipe.models.sdxl import encode_prompts
from sdxlpipe.training import losses, stream
from sdxlpipe.training.batches import as_float
from sdxlpipe.training.data import BatchPlan

# Fractions of the run's timestep range [min_timestep, max_timestep) each item is measured at: five points
# spread over the range, the middle of five equal slices (100, 300, 500, 700, 900 of SDXL's 1000).
TIMESTEP_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
# Columns dropped from the held-out rows: validation reads each item's own caption, not a variant.
VARIANT_COLUMNS = ("text_variant_keys", "caption_variants", "latent_flip_key")


class HeldOut:
    """The held-out items' batches, read from the store like training's, and their loss."""

    def __init__(self, table: pa.Table, store, p, device="cpu", *, stages: dict):
        table = table.drop_columns([c for c in VARIANT_COLUMNS if c in table.column_names])
        # The batches are seeded by validation_seed, so runs with different seeds validate on the same batches.
        self.p = dataclasses.replace(p, seed=p.validation_seed)
        buckets = list(zip(table.column("bucket_w").to_pylist(), table.column("bucket_h").to_pylist()))
        self.plan = BatchPlan(buckets, [1] * len(buckets), p.batch_size, self.p.seed)
        self.source = stream.open_source(table, store, self.p, self.plan, device, stages=stages)
        self.items = table.num_rows

    def timesteps(self) -> list[int]:
        lo, hi = self.p.min_timestep, self.p.max_timestep
        return [min(hi - 1, lo + int(f * (hi - lo))) for f in TIMESTEP_FRACTIONS]

    def loss(self, unet, alphas_cumprod: torch.Tensor, prediction_type: str, device, *, text_stack: dict | None = None,
             text_settings: dict | None = None, compute=torch.float32) -> float:
        """The mean loss over every held-out item and timestep, with `unet` as it is now (eval mode, no grad)."""
        models = [unet, *(text_stack[n] for n in ("text_encoder", "text_encoder_2") if text_stack)]
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        total, count = 0.0, 0
        try:
            with torch.no_grad(), torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32):
                for index in range(self.plan.per_epoch):
                    _, members = self.plan.batch_at(index)
                    batch = as_float(self.source.batch(index, fixed=True))
                    if text_stack:
                        batch["embeds"], batch["pooled"] = encode_prompts(batch["captions"], text_stack, **(text_settings or {}))
                    # On the device once per batch, for all its timesteps.
                    on_device = {"x0": ((batch["mean"] - batch["shift"]) * batch["scale"]).to(device),
                                 **{n: batch[n].to(device) for n in ("embeds", "pooled", "time_ids")},
                                 "mask": batch["mask"].to(device) if batch.get("mask") is not None else None}
                    for k, t in enumerate(self.timesteps()):
                        per_item = self._per_item(unet, on_device, members, k, t, alphas_cumprod, prediction_type,
                                                  device)
                        total += float(per_item.sum())
                        count += per_item.numel()
        finally:
            for m, mode in zip(models, modes):
                m.train(mode)
        return total / max(count, 1)

    def _per_item(self, unet, b: dict, members: list[int], k: int, t: int, alphas_cumprod, prediction_type: str,
                  device) -> torch.Tensor:
        x0 = b["x0"]
        # Each item's own noise at this timestep: the same at every validation, whatever batch it is in.
        noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(
            (self.p.seed * 1_000_003 + m) * 16 + k)) for m in members]).to(device)
        tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=device)
        noisy = losses.add_noise(x0, noise, tt, alphas_cumprod)
        pred = unet(noisy, tt, b["embeds"], added_cond_kwargs={"text_embeds": b["pooled"], "time_ids": b["time_ids"]}
                    ).sample.float()
        target = losses.target(x0, noise, tt, alphas_cumprod, prediction_type)
        c = None
        if self.p.loss_type in ("huber", "smooth_l1"):
            c = losses.huber_c(tt.cpu(), self.p.huber_schedule, self.p.huber_c, alphas_cumprod.cpu()).to(device)
        return losses.per_sample_mean(losses.elementwise_loss(pred, target, self.p.loss_type, c), b["mask"]).cpu()


def open_held_out(table: pa.Table | None, store, p, device="cpu", *, stages: dict) -> HeldOut | None:
    """The validation loss's items, or None when nothing is held out. `stages`: the config's stage modules
    (the store stages the items are read from, as for training's batches)."""
    if table is None or table.num_rows == 0:
        return None
    return HeldOut(table, store, p, device, stages=stages)


def best(history: list) -> dict | None:
    """{"step", "val_loss"} of the lowest validation loss in [[step, loss], ...] (the earliest of equals)."""
    if not history:
        return None
    step, value = min(history, key=lambda sv: (sv[1], sv[0]))
    return {"step": int(step), "val_loss": float(value)}
