"""A tiny UNet with a trained-looking LoRA (r=4, alpha=8), built once per session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from sdxlpipe.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def lora_unet():
    """The tiny UNet (seed 0) with a non-zero peft LoRA on attention, feed-forward and conv layers."""
    import torch
    from peft import LoraConfig

    from sdxlpipe.models.loading import load_unet

    unet = load_unet("tiny")
    config = LoraConfig(
        r=4,
        lora_alpha=8,  # alpha != rank: the only way scaling bugs show
        init_lora_weights=False,  # random B as well as A, so the LoRA changes the output
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        unet.add_adapter(config)
    return unet


def unet_output(unet) -> torch.Tensor:
    """The tiny UNet's output on a fixed random input: what two LoRA loadings must agree on."""
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    hidden = torch.randn(1, 77, 96, generator=g)
    cond = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=hidden, added_cond_kwargs=cond).sample
