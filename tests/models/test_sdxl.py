"""Given prompts, when they are encoded, then they match what the SDXL pipeline computes."""

from __future__ import annotations

import pytest
import torch

from sdxlpipe.models.sdxl import add_time_ids, encode_prompts

PROMPTS = ["a photo of a cat", "", "an oil painting of the sea at night, with stars"]


def pipeline_stack(pipe) -> dict:
    return {n: getattr(pipe, n) for n in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")}


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_encode_prompts_matches_the_pipeline(tiny_pipeline, clip_skip):
    embeds, pooled = encode_prompts(PROMPTS, pipeline_stack(tiny_pipeline), clip_skip=clip_skip)
    with torch.no_grad():
        want, _, want_pooled, _ = tiny_pipeline.encode_prompt(
            PROMPTS, device="cpu", do_classifier_free_guidance=False, clip_skip=clip_skip or None
        )
    assert embeds.shape == (3, 77, 96) and pooled.shape == (3, 32)
    assert torch.equal(embeds, want)
    assert torch.equal(pooled, want_pooled)


def test_encode_prompts_on_loaded_tiny_stack_needs_no_grad():
    from sdxlpipe.models.loading import load_text_stack

    embeds, pooled = encode_prompts(["a cat"], load_text_stack("tiny"))
    assert not embeds.requires_grad and not pooled.requires_grad


def test_only_77_tokens_for_now(tiny_pipeline):
    with pytest.raises(ValueError, match="150"):
        encode_prompts(["a"], pipeline_stack(tiny_pipeline), max_token_length=150)


def test_add_time_ids_follows_sdxl_order():
    assert add_time_ids((1200, 800), (16, 0), (1216, 832)) == [1200, 800, 16, 0, 1216, 832]
