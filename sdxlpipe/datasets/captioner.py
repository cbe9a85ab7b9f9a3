"""An optional captioner: any local transformers image-to-text model (BLIP, GIT, ...).

It captions only the images that have no caption, and each result is a
store item keyed by (image content hash, model fingerprint, prompt,
max_new_tokens): a rerun, another machine on the same store, or a moved
dataset never captions an image twice. The model loads only when an item
is missing, so a no-op run imports no torch.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from sdxlpipe.pipeline.keys import item_key, xxh3_hex

STAGE = "caption"
FIELD = "caption.json"
VERSION = 1
# Workspace table of (key, caption) this checkout has made or read: a no-op reads no payload.
SEEN_TABLE = "captioner"
# Files that shape a model's output; README and the like do not.
WEIGHT_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".bin")


def model_fingerprint(model_dir: str, memo) -> str:
    """xxh3 over the names and content hashes of the model's files (memoized by stat)."""
    root = Path(model_dir)
    parts = [f"{p.relative_to(root).as_posix()}={memo.hash_file(p)}"
             for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
    return xxh3_hex("\n".join(parts))


def caption_images(rows: list[dict], params, ctx) -> list[str | None]:
    """A caption per row (None where the store has none and this run made none).

    The store holds the captions; the workspace table `captioner` remembers the ones this
    checkout has seen, so a no-op run (and `status`) opens no payload. Captions the store
    has but the table lacks (another machine made them) are read once, a shard at a time.
    """
    if not rows:
        return []
    fp = model_fingerprint(params.model, ctx.memo)
    from sdxlpipe.datasets import open_image

    keys = [item_key({"stage": "captioner", "version": VERSION, "content_hash": r["content_hash"], "model": fp,
                      "prompt": params.prompt, "max_new_tokens": params.max_new_tokens,
                      "pixels": open_image.VERSION}) for r in rows]
    unique = list(dict.fromkeys(keys))
    missing = set(ctx.store.missing(STAGE, unique))
    seen = _seen_captions(ctx)
    known = {k: seen[k] for k in unique if k in seen and k not in missing}
    unread = [k for k in unique if k not in missing and k not in known]
    if unread:
        known.update(_read_captions(unread, ctx))
    if missing:
        ctx.log.info("captioner: %d image(s) to caption with %s", len(missing), params.model)
    if missing and not ctx.dry_run:
        first = {}
        for key, row in zip(keys, rows):
            if key in missing:
                first.setdefault(key, row)
        known.update(_generate(list(first.items()), params, ctx))
    if not ctx.dry_run and any(seen.get(k) != v for k, v in known.items()):
        ctx.workspace.write_table(SEEN_TABLE, pa.table({"key": list({**seen, **known}),
                                                        "caption": list({**seen, **known}.values())}))
    return [known.get(key) for key in keys]


def _seen_captions(ctx) -> dict[str, str]:
    table = ctx.workspace.read_table(SEEN_TABLE)
    if table is None or table.column_names != ["key", "caption"]:
        return {}  # none yet, or damaged: the store has them all
    return dict(zip(table.column("key").to_pylist(), table.column("caption").to_pylist()))


def _read_captions(keys: list[str], ctx) -> dict[str, str]:
    from sdxlpipe.cache_format import decode_json, payloads

    found = {}
    for key, data in ctx.store.read_many(STAGE, keys, FIELD):
        if data is not None:
            why = payloads.problem(STAGE, FIELD, data)  # passed its checksum: a writer's mistake, refused
            if why:
                raise payloads.PayloadRefused(ctx.store.url, STAGE, key, None, why)
            found[key] = decode_json(data)["caption"]
    return found


def _generate(items: list[tuple[str, dict]], params, ctx) -> dict[str, str]:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from sdxlpipe.cache_format import encode_json
    from sdxlpipe.datasets.open_image import open_source_image

    processor = AutoProcessor.from_pretrained(params.model, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(params.model, local_files_only=True).eval()
    model.to(ctx.config.device)
    made: dict[str, str] = {}
    with ctx.store.writer(STAGE) as writer, ctx.reporter.track("captioner", len(items)) as advance:
        for start in range(0, len(items), params.batch_size):
            batch = items[start:start + params.batch_size]
            images = [open_source_image(row["source"]) for _, row in batch]
            kwargs = {"images": images, "return_tensors": "pt"}
            if params.prompt:
                kwargs["text"] = [params.prompt] * len(images)
            inputs = processor(**kwargs).to(ctx.config.device)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=params.max_new_tokens, do_sample=False)
            for (key, _), text in zip(batch, processor.batch_decode(out, skip_special_tokens=True)):
                made[key] = text.strip()
                writer.add(key, FIELD, encode_json({"caption": made[key]}))
            advance(len(batch))
    return made
