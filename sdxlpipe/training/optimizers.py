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


def text_encoder_groups(encoders: list, p) -> list[dict]:
    """The text encoders' LoRA weights at text_encoder_lr; with LoRA+ their B matrices at
    text_encoder_lora_plus_ratio (0: lora_plus_ratio) times that, as kohya's loraplus_text_encoder_lr_ratio."""
    lr = p.text_encoder_lr or p.learning_rate
    ratio = p.text_encoder_lora_plus_ratio or p.lora_plus_ratio
    by_lr: dict[float, list] = {}
    for encoder in encoders:
        for name, param in encoder.named_parameters():
            if param.requires_grad:
                plus = ratio and any(f".{b}." in name for b in LORA_PLUS_B)
                by_lr.setdefault(lr * ratio if plus else lr, []).append(param)
    return [{"params": params, "lr": rate} for rate, params in by_lr.items()]


class FusedBackward:
    """Adafactor stepped inside the backward pass (kohya's fused_backward_pass), one weight at a time.

    Each trained weight gets a hook that runs when its gradient is complete: clip that tensor's gradient to
    `max_grad_norm` (per tensor, as kohya does: the global norm is not known yet), step the optimizer on that
    weight alone, and free the gradient. So at most one weight's gradient exists at a time, instead of a
    second copy of every trained weight. The optimizer steps only weights whose gradient is set, so the step
    is restricted by handing it that weight's group alone.
    """

    def __init__(self, optimizer, max_grad_norm: float) -> None:
        self.optimizer, self.max_grad_norm, self.squares = optimizer, max_grad_norm, 0.0
        self.groups = [list(g["params"]) for g in optimizer.param_groups]
        for i, params in enumerate(self.groups):
            for param in params:
                param.register_post_accumulate_grad_hook(lambda q, i=i: self._step(q, i))

    def _step(self, param, group: int) -> None:
        norm = float(param.grad.detach().float().norm())
        self.squares += norm**2  # for the logged (unclipped) global norm
        if self.max_grad_norm and norm > self.max_grad_norm:
            param.grad.mul_(self.max_grad_norm / (norm + 1e-6))
        for j, g in enumerate(self.optimizer.param_groups):
            g["params"] = [param] if j == group else []
        try:
            self.optimizer.step()
        finally:
            for g, params in zip(self.optimizer.param_groups, self.groups):
                g["params"] = params
        param.grad = None

    def take_norm(self) -> torch.Tensor:
        """The global gradient norm of the step just taken (before clipping); resets the sum."""
        norm, self.squares = self.squares**0.5, 0.0
        return torch.tensor(norm)


def fuse_into_backward(optimizer, max_grad_norm: float) -> FusedBackward:
    return FusedBackward(optimizer, max_grad_norm)


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
