"""SDXL's text conditioning: prompt embeddings, pooled embedding, micro-conditioning ids.

`encode_prompts` reproduces StableDiffusionXLPipeline.encode_prompt (without
guidance), so embeddings cached at encode time are the ones the pipeline
would compute at sampling time.
"""

from __future__ import annotations

import contextlib

import torch


def encode_prompts(
    texts: list[str],
    text_stack: dict,
    max_token_length: int = 77,
    clip_skip: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (B, 77, 2048), pooled (B, 1280)) on real SDXL; (B, 77, 96), (B, 32) on tiny.

    prompt_embeds: both encoders' penultimate hidden states (clip_skip counts
    further back), concatenated on the last dim. pooled: text_encoder_2's
    projected text_embeds.
    """
    if max_token_length != 77:
        raise ValueError(f"max_token_length {max_token_length} is not supported yet; only 77")
    encoders = [text_stack["text_encoder"], text_stack["text_encoder_2"]]
    tokenizers = [text_stack["tokenizer"], text_stack["tokenizer_2"]]
    trains = any(p.requires_grad for enc in encoders for p in enc.parameters())
    hidden, pooled = [], None
    with contextlib.nullcontext() if trains else torch.no_grad():
        for tokenizer, encoder in zip(tokenizers, encoders):
            ids = tokenizer(
                texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-(clip_skip + 2)])
            if out[0].ndim == 2:  # the projected encoder's text_embeds
                pooled = out[0]
    return torch.cat(hidden, dim=-1), pooled


def add_time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> list[int]:
    """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    return [int(v) for v in (*original_size, *crop_top_left, *target_size)]
