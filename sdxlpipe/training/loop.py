"""The training loop: LoRA on the SDXL UNet from cached tensors.

Recipe: load the cached latents and text embeddings -> the UNet with a peft
LoRA -> resume from the newest checkpoint if there is one -> for each step:
a batch from one bucket, a fresh latent sample from the stored distribution,
noise, timestep, the SDXL micro-conditioning, MSE on the scheduler's target
-> checkpoint every N steps and at the end -> `done.json`.

Every random draw of step s comes from a generator seeded by (seed, s), so a
resumed run continues the exact loss curve of an unbroken one.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from sdxlpipe.cache_format import decode_tensors
from sdxlpipe.errors import UserError
from sdxlpipe.models import loading
from sdxlpipe.models.sdxl import add_time_ids
from sdxlpipe.training import checkpoints
from sdxlpipe.training.data import batches_from

ADAPTER = "default"


def train_lora(table: pa.Table, params, ctx, run_dir: Path) -> dict:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    rows = table.to_pylist()
    latents, texts = _load_cached(rows, ctx)
    device = torch.device(ctx.config.device)

    torch.manual_seed(params.seed)
    unet = loading.load_unet(ctx.config.model, device=ctx.config.device, allow_pickle=ctx.config.allow_pickle)
    lora_config = LoraConfig(
        r=params.rank, lora_alpha=params.alpha, init_lora_weights="gaussian",
        target_modules=list(params.target_modules),
    )
    unet.add_adapter(lora_config, adapter_name=ADAPTER)
    unet.train()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=params.weight_decay)
    scheduler = loading.load_noise_scheduler(ctx.config.model, allow_pickle=ctx.config.allow_pickle)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)

    start = checkpoints.latest_step(run_dir)
    losses: list[float] = []
    if start:
        ckpt = checkpoints.checkpoint_dir(run_dir, start)
        set_peft_model_state_dict(unet, load_file(ckpt / "adapter.safetensors"), adapter_name=ADAPTER)
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        losses = json.loads((ckpt / "state.json").read_text())["losses"]
        ctx.log.info("resuming %s from step %d", run_dir.name[:12], start)

    def save(step: int) -> Path:
        tmp = Path(tempfile.mkdtemp(dir=run_dir / "checkpoints", prefix=".tmp-"))
        save_file(_contiguous(get_peft_model_state_dict(unet, adapter_name=ADAPTER)), tmp / "adapter.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        checkpoints.write_json(tmp / "adapter_config.json", _lora_config_dict(unet.peft_config[ADAPTER]))
        checkpoints.write_json(tmp / "state.json", {"step": step, "losses": losses})
        return checkpoints.commit_checkpoint(tmp, run_dir, step, params.max_checkpoints)

    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    buckets = [(r["bucket_w"], r["bucket_h"]) for r in rows]
    plan = batches_from(start, buckets, [r["repeats"] for r in rows], params.batch_size, params.seed)
    began = time.monotonic()
    last = None
    with ctx.reporter.track("train", params.max_steps - start) as advance:
        for step in range(start, params.max_steps):
            epoch, batch = next(plan)
            gen = torch.Generator().manual_seed(params.seed * 1_000_003 + step)
            loss = _step(unet, scheduler, alphas_cumprod, [rows[i] for i in batch], latents, texts, gen, device)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            smooth = sum(losses[-20:]) / len(losses[-20:])
            advance(1, loss=f"{smooth:.4f}", epoch=epoch)
            done_steps = step + 1
            if done_steps % params.save_every_steps == 0 or done_steps == params.max_steps:
                last = save(done_steps)
    if last is None:  # the run was already at max_steps when resumed
        last = checkpoints.checkpoint_dir(run_dir, params.max_steps)
    outputs = {
        "checkpoint": str(last),
        "adapter": str(last / "adapter.safetensors"),
        "adapter_config": str(last / "adapter_config.json"),
    }
    result = {
        "steps": params.max_steps, "final_loss": losses[-1] if losses else math.nan,
        "mean_loss_last_20": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "seconds": round(time.monotonic() - began, 3), "outputs": outputs,
    }
    checkpoints.write_json(run_dir / "done.json", result)
    return result


def _step(unet, scheduler, alphas_cumprod, rows, latents, texts, gen, device):
    """One batch's loss: the diffusion MSE on the scheduler's prediction target."""
    mean = torch.stack([latents[r["latent_key"]]["mean"] for r in rows]).float()
    std = torch.stack([latents[r["latent_key"]]["std"] for r in rows]).float()
    scale = float(latents[rows[0]["latent_key"]]["scaling_factor"])
    x0 = (mean + std * torch.randn(mean.shape, generator=gen)) * scale
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
    x0, noise, t = x0.to(device), noise.to(device), t.to(device)
    noisy = scheduler.add_noise(x0, noise, t)
    embeds = torch.stack([texts[r["text_key"]]["prompt_embeds"] for r in rows]).float().to(device)
    pooled = torch.stack([texts[r["text_key"]]["pooled_prompt_embeds"] for r in rows]).float().to(device)
    time_ids = torch.tensor([
        add_time_ids((r["height"], r["width"]), (r["crop_top"], r["crop_left"]), (r["bucket_h"], r["bucket_w"]))
        for r in rows
    ], dtype=torch.float32, device=device)
    pred = unet(noisy, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    else:
        target = noise
    return torch.nn.functional.mse_loss(pred.float(), target.float())


def _load_cached(rows: list[dict], ctx) -> tuple[dict, dict]:
    """Every latent and text payload the run needs, decoded once."""
    latents: dict[str, dict] = {}
    for key, data in ctx.store.read_many("vae_encode", dict.fromkeys(r["latent_key"] for r in rows)):
        if data is not None:
            tensors, meta = decode_tensors(data, "pt")
            latents[key] = {**tensors, "scaling_factor": meta.get("scaling_factor", "1.0")}
    texts: dict[str, dict] = {}
    for key, data in ctx.store.read_many("text_encode", dict.fromkeys(r["text_key"] for r in rows)):
        if data is not None:
            texts[key] = decode_tensors(data, "pt")[0]
    lost = {r["latent_key"] for r in rows} - latents.keys() | ({r["text_key"] for r in rows} - texts.keys())
    if lost:
        raise UserError(
            f"{len(lost)} cached item(s) in {ctx.store.url} are missing or failed their checksum",
            "run the same command again: the encode stages recompute the damaged items first",
        )
    return latents, texts


def _lora_config_dict(config) -> dict:
    d = config.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()
            if isinstance(v, (str, int, float, bool, list, set, dict, type(None)))}


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}
