"""Train: a LoRA on the UNet from the cached latents and text embeddings.

The whole run is one item: its key covers the training params, the UNet and
scheduler weights, the seed and the ordered (latent, text, repeats) samples.
Same key and finished: skipped. Same key and unfinished: resumed from its
last checkpoint. The loop itself lives in `sdxlpipe.training.loop`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pyarrow as pa

from sdxlpipe.pipeline.keys import item_key, xxh3_hex

VERSION = 1
OUTPUT_COLUMNS = ()

# Params that do not change the trained weights stay out of the key.
NOT_IN_KEY = ("save_every_steps", "max_checkpoints")


@dataclass(frozen=True)
class Params:
    # LoRA rank: 4-32 covers most SDXL character/style LoRAs; higher learns more and overfits sooner.
    rank: int = 16
    # LoRA alpha: the update is scaled by alpha/rank; alpha = rank means scale 1.
    alpha: float = 16.0
    # Attention projections, the set kohya and diffusers train by default.
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    # AdamW learning rate; 1e-4 is the usual SDXL LoRA rate.
    learning_rate: float = 1e-4
    # AdamW weight decay (torch's default).
    weight_decay: float = 1e-2
    # Optimiser steps to take.
    max_steps: int = 500
    # Samples per step, all from one bucket.
    batch_size: int = 4
    # Seeds the LoRA init, the batch order and every noise draw.
    seed: int = 0
    # Checkpoint this often (and at the end) so a killed run resumes.
    save_every_steps: int = 100
    # Older checkpoints are deleted beyond this many.
    max_checkpoints: int = 2


def check(p: Params) -> list[tuple[str, str]]:
    problems = []
    for name in ("rank", "max_steps", "batch_size", "save_every_steps", "max_checkpoints"):
        if getattr(p, name) < 1:
            problems.append((f"train.{name}", "must be >= 1"))
    if p.learning_rate <= 0:
        problems.append(("train.learning_rate", "must be > 0"))
    if p.alpha <= 0:
        problems.append(("train.alpha", "must be > 0"))
    return problems


def key_doc(table: pa.Table, params: Params, fp: dict[str, str]) -> dict:
    cols = table.select(["latent_key", "text_key", "repeats"]).to_pydict()
    samples = "\n".join(f"{l} {t} {r}" for l, t, r in zip(cols["latent_key"], cols["text_key"], cols["repeats"]))
    settings = {k: v for k, v in dataclasses.asdict(params).items() if k not in NOT_IN_KEY}
    return {
        "stage": "train", "version": VERSION, "params": settings,
        "unet": fp["unet"], "scheduler": fp["scheduler"],
        "samples": xxh3_hex(samples), "sample_count": table.num_rows,
    }


def run(table: pa.Table, params: Params, ctx) -> pa.Table:
    from sdxlpipe.training import checkpoints

    doc = key_doc(table, params, ctx.models.fingerprints())
    key = item_key(doc)
    run_dir = ctx.workspace.train_dir(key)
    ctx.outputs["train"] = {"key": key, "dir": str(run_dir)}
    done = checkpoints.read_done(run_dir)
    if done is not None:
        ctx.report(items=1, computed=0, reused=1)
        ctx.outputs["train"].update(done["outputs"])
        return table
    if table.num_rows == 0:
        ctx.report(items=1, computed=0, reused=0, failed=1, reasons=["no samples to train on"])
        return table
    latest = checkpoints.latest_step(run_dir)
    reason = f"resuming from step {latest}" if latest else _why_new(ctx, doc)
    ctx.report(items=1, computed=1, reused=0, reasons=[reason])
    if ctx.dry_run:
        return table

    from sdxlpipe.training.loop import train_lora

    checkpoints.write_json(run_dir / "key.json", doc)
    checkpoints.write_json(run_dir / "config.json", ctx.config.to_record())
    result = train_lora(table, params, ctx, run_dir)
    ctx.outputs["train"].update(result["outputs"])
    ctx.workspace.write_record("train-last", {"key": key, **result})
    return table


def _why_new(ctx, doc: dict) -> str:
    """Name what changed since the last finished run in this workspace."""
    root = ctx.workspace.root / "train"
    previous = sorted(root.glob("*/key.json"), key=lambda p: p.stat().st_mtime) if root.exists() else []
    if not previous:
        return "no run yet"
    old = json.loads(previous[-1].read_text())
    changed = [f"train.{k}" for k in doc["params"] if old.get("params", {}).get(k) != doc["params"][k]]
    changed += [k for k in ("unet", "scheduler") if old.get(k) != doc[k]]
    if old.get("samples") != doc["samples"]:
        changed.append(f"samples ({old.get('sample_count')} -> {doc['sample_count']})")
    return "changed: " + ", ".join(changed) if changed else "new run"
