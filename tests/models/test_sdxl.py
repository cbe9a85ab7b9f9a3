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


LONG = " ".join(f"word{i}" for i in range(18))  # about 90 tokens of the tiny tokenizer: past 75, short of 150


def test_words_past_75_tokens_count_only_with_150_or_225(tiny_pipeline):
    stack = pipeline_stack(tiny_pipeline)
    edited = LONG + " and a red hat"
    short = {n: encode_prompts([LONG, edited], stack, max_token_length=n) for n in (75, 150, 225)}
    (e75, p75), (e150, p150), (e225, _) = short[75], short[150], short[225]
    assert e75.shape == (2, 77, 96) and e150.shape == (2, 152, 96) and e225.shape == (2, 227, 96)
    # 75 tokens truncate: the edit at the end is invisible. 150/225 see it.
    assert torch.equal(e75[0], e75[1])
    assert not torch.equal(e150[0], e150[1]) and not torch.equal(e225[0], e225[1])
    # The first chunk is the 75-token encoding: same BOS and body, same pooled embedding.
    assert torch.allclose(e150[:, :76], e75[:, :76], atol=1e-5)
    assert torch.allclose(p150, p75, atol=1e-5)


def test_every_chunk_is_wrapped_in_bos_and_eos(tiny_pipeline):
    from sdxlpipe.models.sdxl import _chunked_ids

    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(tiny_pipeline, name)
        ids = _chunked_ids(tok, [LONG, "a cat"], 225)
        assert ids.shape == (2, 3, 77)
        assert (ids[:, :, 0] == tok.bos_token_id).all()
        # A chunk cut mid-caption ends in EOS; chunks past the caption start <BOS><EOS>.
        assert ids[0, 0, -1] == tok.eos_token_id
        assert ids[1, 2, 1] == tok.eos_token_id


def test_other_token_lengths_are_refused(tiny_pipeline):
    with pytest.raises(ValueError, match="100"):
        encode_prompts(["a"], pipeline_stack(tiny_pipeline), max_token_length=100)


def test_add_time_ids_follows_sdxl_order():
    assert add_time_ids((1200, 800), (16, 0), (1216, 832)) == [1200, 800, 16, 0, 1216, 832]
