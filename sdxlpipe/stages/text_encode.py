"""Text encode: each distinct text's SDXL conditioning, cached in the store.

Recipe: the texts (every caption, every caption variant, and the empty
caption for caption dropout) -> one key per distinct text from the text, the
token length, clip_skip and both text encoders' and tokenizers' weights ->
the keys the store lacks (in this `--shards` partition) -> encode in batches
-> store prompt embeddings and the pooled embedding in fp16 -> `text_key`,
`text_variant_keys` and `empty_text_key` columns. A text used by many rows
is encoded and stored once for the whole dataset.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

from sdxlpipe.models import sdxl
from sdxlpipe.pipeline.keys import item_keys, partition_of
from sdxlpipe.pipeline.plan import plan_items, walk_chunks, write_results

VERSION = 1
# The table columns holding keys of this stage's store items: the runner checks them for damage.
STORE_COLUMNS = ("text_key", "text_variant_keys", "empty_text_key")
# The model parts this stage's items depend on: `status` names them when their weights change.
MODELS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
OUTPUT_COLUMNS = ("text_key", "text_variant_keys", "empty_text_key")
FIELD = "text.safetensors"
# Its items are distinct texts: captions, their variants and the empty caption.
ITEMS = "texts"
# fp16 bytes per token of SDXL's prompt embeddings (768 + 1280 channels): sizes chunks.
BYTES_PER_TOKEN = 2048 * 2


@dataclass(frozen=True)
class Params:
    # Captions per encoder call; text encoding is cheap, so larger batches only help.
    batch_size: int = 32
    # Caption tokens kept: 75 is CLIP's window; 150/225 encode 75-token chunks and join
    # them (kohya's SDXL scheme), for long tag lists. Longer embeddings cost memory in training.
    max_token_length: Literal[75, 150, 225] = 75
    # 0 = SDXL's own choice (penultimate layer); N skips N more layers.
    clip_skip: int = 0


def check(p: Params) -> list[tuple[str, str]]:
    problems = []
    if p.batch_size < 1:
        problems.append(("text_encode.batch_size", "must be >= 1"))
    if p.clip_skip < 0:
        problems.append(("text_encode.clip_skip", "must be >= 0"))
    return problems


def export_metadata(settings: dict, rows: pa.Table, ctx) -> dict[str, str]:
    """kohya's text-encoder fields for the rows whose captions these settings encoded."""
    return {"ss_max_token_length": str(settings["max_token_length"]), "ss_clip_skip": str(settings["clip_skip"] or "")}


def key_doc(text: str, params: Params, fp: dict[str, str]) -> dict:
    return {
        "stage": "text_encode", "version": VERSION, "text": text,
        "encoding": sdxl.VERSION,  # models/sdxl.py turns the text into embeddings
        "max_token_length": params.max_token_length, "clip_skip": params.clip_skip,
        "text_encoder": fp["text_encoder"], "text_encoder_2": fp["text_encoder_2"],
        "tokenizer": fp["tokenizer"], "tokenizer_2": fp["tokenizer_2"],
    }


def keys_of(texts: list[str], params: Params, fp: dict[str, str]) -> list[str]:
    """`item_key(key_doc(text, ...))` of every text, bit for bit (pipeline/keys.item_keys: ~5x faster)."""
    fixed = key_doc("", params, fp)
    del fixed["text"]
    return item_keys(fixed, {"text": texts})


def run(table: pa.Table, params: Params, ctx) -> pa.Table:
    fp = ctx.models.fingerprints()
    captions = table.column("caption").to_pylist()
    if "caption_variants" in table.column_names:
        variants = [v if v is not None else [c] for v, c in zip(table.column("caption_variants").to_pylist(), captions)]
    else:
        variants = [[c] for c in captions]
    # No rows, no texts: an empty dataset must not load the text encoders for the empty caption alone.
    texts = list(dict.fromkeys(captions + [t for vs in variants for t in vs] + ([""] if captions else [])))
    key_of = dict(zip(texts, keys_of(texts, params, fp)))
    todo = set(plan_items(ctx, key_of.values()))
    if todo and not ctx.dry_run:
        _encode([t for t in texts if key_of[t] in todo], key_of, params, ctx)
    table = table.append_column("text_key", pa.array([key_of[c] for c in captions], pa.string()))
    table = table.append_column("text_variant_keys", pa.array([[key_of[t] for t in vs] for vs in variants],
                                                              pa.list_(pa.string())))
    return table.append_column("empty_text_key", pa.array([key_of[""]] * len(captions) if captions else [], pa.string()))


def _chunks(texts: list[str], key_of: dict[str, str], total: int, params: Params, store) -> list[list[dict]]:
    """Shard-sized groups of texts that depend on the dataset's text count, never on timing."""
    per_shard = store.chunk_size(BYTES_PER_TOKEN * (params.max_token_length + 2))  # one shard a chunk
    n = max(1, math.ceil(total / per_shard))
    chunks: dict[int, list[dict]] = {}
    for t in texts:
        chunks.setdefault(partition_of(key_of[t], n), []).append({"key": key_of[t], "text": t})
    return [sorted(chunks[c], key=lambda j: j["key"]) for c in sorted(chunks)]


def _encode(texts: list[str], key_of: dict[str, str], params: Params, ctx) -> None:
    from sdxlpipe.engines import run_engine

    engine = run_engine(ctx, 0)
    chunks = _chunks(texts, key_of, len(key_of), params, ctx.store)
    make_worker = functools.partial(TextWorker, ctx.models.loader("text", portable=engine.name != "local"),
                                    params.max_token_length, params.clip_skip)
    fp = ctx.models.fingerprints()  # `store du` counts bytes per pair of text encoders
    group = f"text_encoder:{fp['text_encoder']},text_encoder_2:{fp['text_encoder_2']}"
    # The text encoders never fail an item (no notes, no None payloads), so `failed` stays empty.
    write = functools.partial(write_results, stage="text_encode", field=FIELD, ctx=ctx, failed=set(), group=group)
    with ctx.reporter.track("text_encode", len(texts)) as advance:
        if engine.name == "local":
            # As vae_encode: the model first, then this writer's order, skipping others' commits.
            worker = make_worker()
            for chunk, missing in walk_chunks(ctx, "text_encode", chunks, lambda j: [j["key"]], advance):
                chunk = [j for j in chunk if j["key"] in missing]
                write(engine.run(chunk, None, lambda: worker, params.batch_size), advance=advance)
        else:
            jobs = [{**j, "chunk": i} for i, c in enumerate(chunks) for j in c]
            write(engine.run(jobs, None, make_worker, params.batch_size), advance=advance)


class TextWorker:
    """The model side: texts in, safetensors payloads out. `load_stack(dtype)` gives the encoders."""

    def __init__(self, load_stack, max_token_length: int, clip_skip: int):
        self.stack = load_stack("float32")
        self.max_token_length = max_token_length
        self.clip_skip = clip_skip

    def __call__(self, jobs: list[dict], prepared: list) -> list:
        import torch

        from sdxlpipe.cache_format import encode_tensors
        from sdxlpipe.models.sdxl import encode_prompts

        embeds, pooled = encode_prompts([j["text"] for j in jobs], self.stack, self.max_token_length, self.clip_skip)
        return [
            (j["key"], encode_tensors({"prompt_embeds": embeds[i].to(torch.float16).contiguous(),
                                       "pooled_prompt_embeds": pooled[i].to(torch.float16).contiguous()}),
             "", j.get("chunk"), "")
            for i, j in enumerate(jobs)
        ]
