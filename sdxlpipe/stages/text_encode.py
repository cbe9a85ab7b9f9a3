"""Text encode: each distinct caption's SDXL conditioning, cached in the store.

Recipe: one key per distinct text (plus the empty caption, for caption
dropout) from the text and both text encoders' weights -> the keys the
store lacks -> encode in batches -> store prompt embeddings and the pooled
embedding in fp16 -> `text_key` and `empty_text_key` columns. Identical
captions are encoded once for the whole dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

from sdxlpipe.pipeline.keys import item_key
from sdxlpipe.pipeline.plan import plan_items

VERSION = 1
OUTPUT_COLUMNS = ("text_key", "empty_text_key")
FIELD = "text.safetensors"


@dataclass(frozen=True)
class Params:
    # Captions per encoder call; text encoding is cheap, so larger batches only help.
    batch_size: int = 32
    # CLIP's window; 150/225 (SDXL chunking) come with the encode issue.
    max_token_length: Literal[77] = 77
    # 0 = SDXL's own choice (penultimate layer); N skips N more layers.
    clip_skip: int = 0


def check(p: Params) -> list[tuple[str, str]]:
    problems = []
    if p.batch_size < 1:
        problems.append(("text_encode.batch_size", "must be >= 1"))
    if p.clip_skip < 0:
        problems.append(("text_encode.clip_skip", "must be >= 0"))
    return problems


def key_doc(text: str, params: Params, fp: dict[str, str]) -> dict:
    return {
        "stage": "text_encode", "version": VERSION, "text": text,
        "max_token_length": params.max_token_length, "clip_skip": params.clip_skip,
        "text_encoder": fp["text_encoder"], "text_encoder_2": fp["text_encoder_2"],
        "tokenizer": fp["tokenizer"], "tokenizer_2": fp["tokenizer_2"],
    }


def run(table: pa.Table, params: Params, ctx) -> pa.Table:
    fp = ctx.models.fingerprints()
    captions = table.column("caption").to_pylist()
    texts = list(dict.fromkeys(captions + [""]))
    key_of = {t: item_key(key_doc(t, params, fp)) for t in texts}
    todo = set(plan_items(ctx, key_of.values()))
    if todo and not ctx.dry_run:
        _encode([t for t in texts if key_of[t] in todo], key_of, params, ctx)
    table = table.append_column("text_key", pa.array([key_of[c] for c in captions], pa.string()))
    return table.append_column("empty_text_key", pa.array([key_of[""]] * len(captions), pa.string()))


def _encode(texts: list[str], key_of: dict[str, str], params: Params, ctx) -> None:
    import torch

    from sdxlpipe.cache_format import encode_tensors
    from sdxlpipe.models.sdxl import encode_prompts

    stack = ctx.models.text_stack()
    with ctx.store.writer("text_encode") as writer, ctx.reporter.track("text_encode", len(texts)) as advance:
        for start in range(0, len(texts), params.batch_size):
            batch = texts[start:start + params.batch_size]
            embeds, pooled = encode_prompts(batch, stack, params.max_token_length, params.clip_skip)
            for i, text in enumerate(batch):
                payload = encode_tensors({
                    "prompt_embeds": embeds[i].to(torch.float16).contiguous(),
                    "pooled_prompt_embeds": pooled[i].to(torch.float16).contiguous(),
                })
                writer.add(key_of[text], FIELD, payload)
            advance(len(batch))
