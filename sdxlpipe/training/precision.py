"""The training loop's mixed precision: accelerate's setting, fp16's own loss scaler, compute dtypes.

fp16's autocast and loss scaler are the loop's own (accelerate does fp16 on
GPUs only, and its scaler refuses fp16 gradients, which full_fp16 has): the
same code on a GPU and on a CPU, where tests run it. How each weight is
stored (fp8, full_bf16/full_fp16) is `networks.set_precision`'s.
"""

from __future__ import annotations

import torch

# Compute dtype of each mixed_precision setting.
COMPUTE = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def accelerate(p, device: str):
    """(accelerate's Accelerator for the run, the fp16 loss scaler or None).

    device: the config's device setting ("cpu" keeps accelerate off any GPU).
    """
    from accelerate import Accelerator

    fp16 = p.mixed_precision == "fp16"
    accelerator = Accelerator(mixed_precision="no" if fp16 else p.mixed_precision, cpu=device == "cpu",
                              gradient_accumulation_steps=p.gradient_accumulation_steps)
    return accelerator, fp16_scaler(accelerator.device) if fp16 else None


def fp16_scaler(device):
    """torch's dynamic loss scaler for `device`, allowed to unscale fp16 gradients (full_fp16 has them; torch
    refuses by default because fp16 weights lose small updates, which is what full_fp16 accepts, as kohya's
    --full_fp16 does with the same patch)."""
    scaler = torch.amp.GradScaler(device.type)
    unscale = scaler._unscale_grads_
    scaler._unscale_grads_ = lambda optimizer, inv_scale, found_inf, allow_fp16: unscale(optimizer, inv_scale, found_inf, True)
    return scaler
