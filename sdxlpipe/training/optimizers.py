"""Optimisers, their parameter groups (per-block LRs, LoRA+) and the LR schedule.

8-bit AdamW needs bitsandbytes and Prodigy needs prodigyopt: both are
optional, and a missing one is a `UserError` naming the pip command.
Adafactor comes with transformers.
"""

from __future__ import annotations

import torch

from sdxlpipe.errors import UserError
from sdxlpipe.training.networks import block_index

# B matrices, the ones LoRA+ (Hayou et al. 2024) gives a higher rate.
LORA_PLUS_B = ("lora_B", "lora_up")


def param_groups(unet, p) -> list[dict]:
    """Trainable parameters grouped by learning rate; a block with rate 0 is frozen."""
    layers = unet.config.layers_per_block
    layers = layers if isinstance(layers, int) else layers[0]
    by_lr: dict[float, list] = {}
    for name, param in unet.named_parameters():
        if not param.requires_grad:
            continue
        lr = p.block_lrs[block_index(name, layers)] if p.block_lrs else p.learning_rate
        if p.lora_plus_ratio and any(f".{b}." in name for b in LORA_PLUS_B):
            lr *= p.lora_plus_ratio
        if lr == 0:
            param.requires_grad_(False)
            continue
        by_lr.setdefault(lr, []).append(param)
    return [{"params": params, "lr": lr} for lr, params in by_lr.items()]


def build_optimizer(groups: list[dict], p) -> torch.optim.Optimizer:
    if p.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=p.learning_rate, weight_decay=p.weight_decay)
    if p.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise UserError(f"train.optimizer = \"adamw8bit\" needs bitsandbytes ({e})",
                            "pip install bitsandbytes (it needs a CUDA GPU), or use optimizer = \"adamw\"") from None
        return bnb.optim.AdamW8bit(groups, lr=p.learning_rate, weight_decay=p.weight_decay)
    if p.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed rate, like kohya's recommended SDXL Adafactor settings.
        return Adafactor(groups, lr=p.learning_rate, weight_decay=p.weight_decay,
                         scale_parameter=False, relative_step=False, warmup_init=False)
    if p.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise UserError("train.optimizer = \"prodigy\" needs prodigyopt",
                            "pip install prodigyopt, or use optimizer = \"adamw\"") from None
        # Prodigy estimates the step size itself: learning_rate is a multiplier, 1.0 as its authors advise.
        return Prodigy(groups, lr=p.learning_rate, weight_decay=p.weight_decay)
    raise ValueError(f"unknown optimizer {p.optimizer!r}")


def warmup_steps(p, max_steps: int) -> int:
    """lr_warmup below 1 is a fraction of the run, from 1 up a number of steps."""
    return int(round(p.lr_warmup * max_steps)) if p.lr_warmup < 1 else int(p.lr_warmup)


def build_scheduler(optimizer, p, max_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(p.lr_scheduler, optimizer, num_warmup_steps=warmup_steps(p, max_steps),
                         num_training_steps=max_steps, num_cycles=p.lr_cycles)
