"""The train stage's step time against a bare diffusers + torch loop: the pipeline's overhead.

    OMP_NUM_THREADS=1 python bench/train_step.py            # tiny model, LoRA r4, batch 8, 128 px
    python bench/train_step.py --steps 40 --batch 4 --size 64

Both sides train the same tiny UNet with the same LoRA (rank 4, the
attention projections), AdamW, DDPM noise and an MSE loss on the same
batch shape. The stage's step time is the difference between a long and a
short run divided by the extra steps, so loading, the evaluation loss and
the final checkpoint cancel out; it includes everything a step does in the
stage (seeded draws, batch assembly from cached tensors, accelerate,
clipping, logging). Prints the two times and their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch


def stage_seconds(root: Path, steps: int, batch: int, size: int, loader_workers: int = 2, reporter=None) -> float:
    from sdxlpipe.cache_format import encode_tensors, open_store
    from sdxlpipe.config import load_config
    from sdxlpipe.pipeline.context import Context, Models
    from sdxlpipe.pipeline.hashing import ContentMemo
    from sdxlpipe.pipeline.keys import xxh3_hex
    from sdxlpipe.pipeline.progress import Reporter
    from sdxlpipe.pipeline.workspace import Workspace
    from sdxlpipe.stages import train

    root.mkdir(parents=True)
    (root / "images").mkdir()
    (root / "sdxlpipe.toml").write_text('model = "tiny"\n[[sources]]\npath = "images"\n')
    config = load_config(root / "sdxlpipe.toml")
    ws = Workspace(config.workspace)
    memo = ContentMemo(ws.memo_path)
    ctx = Context(config=config, store=open_store(config.store_url), workspace=ws, memo=memo,
                  reporter=reporter or Reporter(enabled=False), models=Models(config, memo), stage="train")
    g = torch.Generator().manual_seed(0)
    side = size // 8
    rows = []
    with ctx.store.writer("vae_encode") as lw, ctx.store.writer("text_encode") as tw:
        for i in range(batch):
            lw.add(xxh3_hex(f"l{i}"), "latent.safetensors", encode_tensors(
                {"mean": torch.randn(4, side, side, generator=g).half(), "std": torch.full((4, side, side), 0.1).half()},
                {"scaling_factor": "0.13025"}))
            tw.add(xxh3_hex(f"t{i}"), "text.safetensors", encode_tensors(
                {"prompt_embeds": torch.randn(77, 96, generator=g).half(), "pooled_prompt_embeds": torch.randn(32, generator=g).half()}))
            rows.append({"latent_key": xxh3_hex(f"l{i}"), "text_key": xxh3_hex(f"t{i}"), "repeats": 1, "width": size, "height": size,
                         "crop_top": 0, "crop_left": 0, "bucket_w": size, "bucket_h": size})
    p = dataclasses.replace(train.Params(), rank=4, alpha=4.0, batch_size=batch, max_steps=steps,
                            save_every_steps=steps, learning_rate=1e-4, max_grad_norm=0.0, loader_workers=loader_workers)
    train.run(pa.Table.from_pylist(rows), p, ctx)
    return json.loads((Path(ctx.outputs["train"]["dir"]) / "done.json").read_text())["seconds"]


def bare_step_seconds(steps: int, batch: int, size: int) -> float:
    """The plainest loop a diffusers user would write, on the same model and batch."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from sdxlpipe.models.tiny import build_tiny_component

    unet = build_tiny_component("unet").requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    unet.train()
    opt = torch.optim.AdamW([q for q in unet.parameters() if q.requires_grad], lr=1e-4)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    side = size // 8
    latents = torch.randn(batch, 4, side, side) * 0.13025
    embeds, pooled = torch.randn(batch, 77, 96), torch.randn(batch, 32)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32)
    began = None
    for i in range(steps + 3):
        if i == 3:  # warm-up steps
            began = time.perf_counter()
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,))
        pred = unet(sched.add_noise(latents, noise, t), t, embeds,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        torch.nn.functional.mse_loss(pred, noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - began) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()
    bare = bare_step_seconds(args.steps, args.batch, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        short = stage_seconds(Path(tmp) / "short", 5, args.batch, args.size)
        long = stage_seconds(Path(tmp) / "long", 5 + args.steps, args.batch, args.size)
    stage = (long - short) / args.steps
    print(f"tiny UNet, LoRA r4, batch {args.batch}, {args.size} px, {torch.get_num_threads()} thread(s), {args.steps} steps")
    print(f"bare diffusers+torch loop: {bare * 1000:7.1f} ms/step")
    print(f"sdxlpipe train stage:      {stage * 1000:7.1f} ms/step")
    print(f"ratio (stage / bare):      {stage / bare:7.2f}")


if __name__ == "__main__":
    main()
