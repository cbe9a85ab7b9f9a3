"""Caption: the text each image is trained with, and its seeded variants.

Recipe: the caption ingest found (sidecar, manifest column, tar `.txt`),
else the optional captioner's, else the file stem or instance prompt ->
`caption`: wildcards at their first option, tags in their original order,
prefix and suffix -> `caption_variants`: N seeded variants (shuffled tags
after the first `keep_tokens`, tag dropout, random wildcard options), or
just [caption] when nothing is randomised. Caption dropout is no variant:
the train stage swaps in the cached empty caption (`train.caption_dropout`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

VERSION = 2
OUTPUT_COLUMNS = ("caption", "caption_variants")


@dataclass(frozen=True)
class Captioner:
    # A local transformers image-to-text model directory (e.g. BLIP); empty = no captioner. follow_links:
    # a Hub snapshot is a folder of links into blobs/.
    model: str = field(default="", metadata={"path": True, "follow_links": True})
    # Text the caption starts from (BLIP's conditional captioning); empty for plain captioning.
    prompt: str = ""
    # Longest caption generated, in tokens; 40 covers a BLIP sentence.
    max_new_tokens: int = 40
    # Images per generate call; small because captioning runs once per image.
    batch_size: int = 8
    # Also caption images whose caption is only their file name; off: only images with no caption at all.
    replace_stem: bool = True


@dataclass(frozen=True)
class Params:
    # Prepended to every caption, e.g. a trigger word "sks dog, " (never shuffled or dropped).
    caption_prefix: str = ""
    # Appended to every caption.
    caption_suffix: str = ""
    # Splits booru-style tags; "," for "1girl, solo, smile".
    separator: str = ","
    # The first N tags stay in place (a trigger word or character name), as in kohya.
    keep_tokens: int = 0
    # Shuffle the tags after keep_tokens in each variant (kohya's shuffle_caption).
    shuffle_tags: bool = False
    # Chance each tag after keep_tokens is left out of a variant (kohya's caption_tag_dropout_rate).
    tag_dropout: float = 0.0
    # Fixed variants per image when anything is randomised; each is text-encoded once, so more costs cache.
    variants: int = 8
    # Seeds the variants (with each image's content hash): change it for different shuffles.
    seed: int = 0
    captioner: Captioner = Captioner()


def check(p: Params) -> list[tuple[str, str]]:
    problems = []
    if not 0.0 <= p.tag_dropout < 1.0:
        problems.append(("caption.tag_dropout", "must be in [0, 1)"))
    if p.keep_tokens < 0:
        problems.append(("caption.keep_tokens", "must be >= 0"))
    if p.variants < 1:
        problems.append(("caption.variants", "must be >= 1"))
    if not p.separator:
        problems.append(("caption.separator", 'must not be empty; "," splits booru tags'))
    if p.captioner.model:
        from pathlib import Path

        if not Path(p.captioner.model).is_dir():
            problems.append(("caption.captioner.model", f"not a model directory: {p.captioner.model}"))
    return problems


def export_metadata(settings: dict, rows: pa.Table, ctx) -> dict[str, str]:
    """kohya's caption fields for the rows these settings captioned: the tag options and, per subset, how many
    training captions hold each tag (regularisation images left out, as kohya counts them)."""
    import json

    from sdxlpipe.datasets.tags import tag_frequency

    cols = rows.select([c for c in ("caption", "subset", "is_reg") if c in rows.column_names]).to_pydict()
    is_reg = cols.get("is_reg", [False] * rows.num_rows)
    captions = [c for c, r in zip(cols.get("caption", []), is_reg) if not r]
    subsets = [s for s, r in zip(cols.get("subset", []), is_reg) if not r]
    return {"ss_caption_tag_dropout_rate": str(settings["tag_dropout"]),
            "ss_shuffle_caption": str(settings["shuffle_tags"]), "ss_keep_tokens": str(settings["keep_tokens"]),
            # The captions as trained, prefix and suffix included.
            "ss_tag_frequency": json.dumps(tag_frequency(subsets, captions, settings["separator"]))}


def randomised(p: Params, texts: list[str]) -> bool:
    from sdxlpipe.datasets.tags import WILDCARD

    return p.shuffle_tags or p.tag_dropout > 0 or any(WILDCARD.search(t) for t in texts)


def run(table: pa.Table, params: Params, ctx) -> pa.Table:
    from sdxlpipe.datasets.tags import join_tags, resolve_wildcards, split_tags, tag_frequency, variants

    found = table.column("sidecar_caption").to_pylist()
    origins = table.column("caption_origin").to_pylist()
    defaults = table.column("default_caption").to_pylist()
    hashes = table.column("content_hash").to_pylist()
    texts = [f if f else d for f, d in zip(found, defaults)]
    if params.captioner.model:
        from sdxlpipe.datasets.captioner import caption_images

        wanted = {"", "prompt"} | ({"stem"} if params.captioner.replace_stem else set())
        todo = [i for i, o in enumerate(origins) if o in wanted]
        generated = caption_images(table.take(todo).to_pylist() if todo else [], params.captioner, ctx)
        for i, text in zip(todo, generated):
            if text:
                texts[i], origins[i] = text, "captioner"
    shuffle_any = randomised(params, texts)
    captions, all_variants = [], []
    for text, digest in zip(texts, hashes):
        canonical = resolve_wildcards(text, None)
        if params.shuffle_tags or params.tag_dropout > 0:
            canonical = join_tags(split_tags(canonical, params.separator), params.separator)
        captions.append(_wrap(canonical, params))
        if shuffle_any:
            vs = variants(text, separator=params.separator, keep_tokens=params.keep_tokens,
                          shuffle=params.shuffle_tags, tag_dropout=params.tag_dropout,
                          count=params.variants, seed=f"{params.seed}/{digest}/{text}")
            all_variants.append([_wrap(v, params) for v in vs])
        else:
            all_variants.append([captions[-1]])
    ctx.outputs["tag_frequency"] = tag_frequency(table.column("subset").to_pylist(), captions, params.separator)
    table = table.drop_columns([c for c in ("caption_origin",) if c in table.column_names])
    table = table.append_column("caption_origin", pa.array(origins, pa.string()))
    table = table.append_column("caption", pa.array(captions, pa.string()))
    return table.append_column("caption_variants", pa.array(all_variants, pa.list_(pa.string())))


def _wrap(text: str, p: Params) -> str:
    return f"{p.caption_prefix}{text}{p.caption_suffix}"
