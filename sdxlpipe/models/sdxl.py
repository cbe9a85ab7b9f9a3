"""SDXL's text conditioning: prompt embeddings, pooled embedding, micro-conditioning ids.

`encode_prompts` reproduces StableDiffusionXLPipeline.encode_prompt (without
guidance), so embeddings cached at encode time are the ones the pipeline
would compute at sampling time.
"""

from __future__ import annotations

import contextlib

# Bump when a change here alters the embeddings (tokenizing, chunking, layers taken,
# pooling): it enters every text_encode key, so cached embeddings are recomputed.
# torch is imported inside the functions, so text_encode reads this on the no-op path.
VERSION = 1

# Tokens a caption may use: 75 is CLIP's window without BOS/EOS; 150 and 225
# split the caption into 75-token chunks (kohya's SDXL long-prompt scheme).
MAX_TOKEN_LENGTHS = (75, 150, 225)


def encode_prompts(
    texts: list[str],
    text_stack: dict,
    max_token_length: int = 75,
    clip_skip: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (B, L, 2048), pooled (B, 1280)) on real SDXL; (B, L, 96), (B, 32) on tiny.

    prompt_embeds: both encoders' penultimate hidden states (clip_skip counts
    further back), concatenated on the last dim. pooled: text_encoder_2's
    projected text_embeds. L = 77 for 75 tokens (exactly the pipeline's
    encode_prompt); for 150/225 each 75-token chunk is wrapped in BOS/EOS,
    encoded alone, and the chunks' states are joined without their inner
    BOS/EOS, giving L = max_token_length + 2, with the pooled embedding of the
    first chunk (kohya sd-scripts' SDXL scheme).
    """
    import torch
    if max_token_length == 77:  # the old spelling: CLIP's 77 positions = 75 tokens + BOS/EOS
        max_token_length = 75
    if max_token_length not in MAX_TOKEN_LENGTHS:
        raise ValueError(f"max_token_length {max_token_length} is not supported; use one of {MAX_TOKEN_LENGTHS}")
    encoders = [text_stack["text_encoder"], text_stack["text_encoder_2"]]
    tokenizers = [text_stack["tokenizer"], text_stack["tokenizer_2"]]
    trains = any(p.requires_grad for enc in encoders for p in enc.parameters())
    hidden, pooled = [], None
    with contextlib.nullcontext() if trains else torch.no_grad():
        for tokenizer, encoder in zip(tokenizers, encoders):
            window = tokenizer.model_max_length
            if max_token_length == window - 2:
                ids = tokenizer(texts, padding="max_length", max_length=window, truncation=True,
                                return_tensors="pt").input_ids
                n_chunks = 1
            else:
                ids = _chunked_ids(tokenizer, texts, max_token_length)
                n_chunks = ids.shape[1]
                ids = ids.reshape(-1, window)
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            states = out.hidden_states[-(clip_skip + 2)]
            if n_chunks > 1:
                states = _join_chunks(states.reshape(len(texts), n_chunks, window, -1))
            hidden.append(states)
            if out[0].ndim == 2:  # the projected encoder's text_embeds
                pooled = out[0].reshape(len(texts), n_chunks, -1)[:, 0]
    return torch.cat(hidden, dim=-1), pooled


def _chunked_ids(tokenizer, texts: list[str], max_token_length: int) -> torch.Tensor:
    """(B, n_chunks, 77) ids: each 75-token slice between its own BOS and EOS/pad."""
    import torch
    window = tokenizer.model_max_length
    body = window - 2
    ids = tokenizer(texts, padding="max_length", max_length=max_token_length + 2, truncation=True,
                    return_tensors="pt").input_ids
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for i in range(1, max_token_length + 1, body):
        chunk = torch.cat([ids[:, :1], ids[:, i:i + body], ids[:, -1:]], dim=1)
        if pad != eos:
            # tokenizer_2 pads with "!": a chunk cut mid-caption must still end in EOS,
            # and a chunk holding no caption at all reads <BOS><EOS><pad>... as SDXL's does.
            cut = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
            chunk[cut, -1] = eos
            empty = chunk[:, 1] == pad
            chunk[empty, 1] = eos
        chunk[:, 0] = bos
        chunks.append(chunk)
    return torch.stack(chunks, dim=1)


def _join_chunks(states: torch.Tensor) -> torch.Tensor:
    """(B, n, 77, D) -> (B, 75 n + 2, D): first BOS, every chunk's body, last EOS."""
    import torch
    parts = [states[:, 0, :1]] + [states[:, c, 1:-1] for c in range(states.shape[1])] + [states[:, -1, -1:]]
    return torch.cat(parts, dim=1)


def add_time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> list[int]:
    """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    return [int(v) for v in (*original_size, *crop_top_left, *target_size)]
