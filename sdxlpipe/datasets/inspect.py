"""`sdxlpipe inspect`: the dataset as a user wants to see it before spending GPU hours.

Runs the data stages (ingest, caption, bucket: cheap, cached like `run`),
adds the rows of the config's dataset sources (published snapshots, as
training joins them), then summarises: samples per source, rejected files, buckets with counts
and the short batches a batch size leaves, caption length and token counts
(how many captions pass the 75-token window), and the top tags. The same
numbers, drawn, with every image, are the report's Dataset page
(`sdxlpipe report`, or `inspect --plot`).
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path
from typing import Any

# CLIP sees 75 tokens between its BOS and EOS; longer captions are cut.
TOKEN_WINDOW = 75


def inspect_dataset(config, batch_size: int | None = None, top_tags: int = 20) -> dict[str, Any]:
    from sdxlpipe.datasets.tags import split_tags
    from sdxlpipe.pipeline.runner import run_pipeline
    from sdxlpipe.pipeline.workspace import Workspace
    from sdxlpipe.training.holdout import COLUMN, held_out_mask

    report = run_pipeline(config, "bucket")
    table = Workspace(config.workspace).read_table("bucket")
    table, datasets = _with_datasets(config, table)
    rows = table.to_pylist() if table is not None else []
    if batch_size is None:
        batch_size = getattr(config.params.get("train"), "batch_size", 1) or 1
    # Held-out items (validation) are listed but do not train: the buckets and samples per epoch leave them out.
    split = getattr(config.params.get("train"), "validation_split", 0.0)
    held = held_out_mask(table, split) if table is not None else []
    trains = [r for r, h in zip(rows, held) if not h]
    separator = getattr(config.params.get("caption"), "separator", ",")

    sources: dict[str, dict] = {}
    for r, h in zip(rows, held):
        # A dataset's subsets are named after it: its publisher named them, and they may repeat the config's.
        dataset = datasets.get(r.get("source_index"))
        name = f"{dataset}/{r['subset']}" if dataset else r["subset"]
        s = sources.setdefault(name, {"images": 0, "samples_per_epoch": 0, "is_reg": r["is_reg"],
                                      "validation": bool(r.get(COLUMN)), "caption_from": Counter(),
                                      **({"dataset": dataset} if dataset else {})})
        s["images"] += 1
        s["samples_per_epoch"] += 0 if h else r["repeats"]
        s["caption_from"][r.get("caption_origin") or "none"] += 1
    for s in sources.values():
        s["caption_from"] = dict(s["caption_from"])

    per_bucket: dict[tuple[int, int], list[int]] = {}
    for r in trains:
        counts = per_bucket.setdefault((r["bucket_w"], r["bucket_h"]), [0, 0])
        counts[0] += 1
        counts[1] += r["repeats"]
    buckets = [
        {"bucket": [w, h], "images": n, "samples_per_epoch": s, "full_batches": s // batch_size,
         "short_batch": s % batch_size}
        for (w, h), (n, s) in sorted(per_bucket.items(), key=lambda kv: kv[0][0] / kv[0][1])
    ]

    captions = [r["caption"] for r in rows]
    words = [len(c.split()) for c in captions]
    tokens, tokenizer_note = _token_counts(config, captions)
    tags = Counter(t for c in captions for t in set(split_tags(c, separator)))
    return {
        "samples": len(rows), "samples_per_epoch": sum(r["repeats"] for r in trains),
        # Items the validation loss is measured on, not trained on: from kind = "validation" sources, and
        # picked by train.validation_split.
        "held_out": {"items": len(rows) - len(trains), "from_sources": sum(bool(r.get(COLUMN)) for r in rows),
                     "validation_split": split},
        "sources": sources,
        "rejected": report["rejected"],
        "batch_size": batch_size,
        "buckets": buckets,
        "samples_in_short_batches": sum(b["short_batch"] for b in buckets),
        "captions": {
            "empty": sum(1 for c in captions if not c.strip()),
            "words": _spread(words),
            "tokens": _spread(tokens) if tokens else None,
            "over_token_window": sum(1 for t in tokens if t > TOKEN_WINDOW) if tokens else None,
            "tokenizer": tokenizer_note,
        },
        # Ties by name: the same order in every process (set order follows the per-process string hash).
        "top_tags": [[t, n] for t, n in sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))[:top_tags]],
    }


def _with_datasets(config, table):
    """The bucket table with the rows of the config's dataset sources joined (pipeline/sources.py), and
    {source index: "name@snapshot"} of those sources. Their captions, buckets and held-out flags are the
    snapshot's, as training reads them; a dataset that cannot be opened is the error `run` would give."""
    import logging

    from sdxlpipe.pipeline.sources import join, open_datasets

    if not any(s.kind == "dataset" for s in config.params["ingest"].sources):
        return table, {}
    # No fingerprints: inspect loads no model, so it does not warn about a dataset of another one (run does).
    datasets = open_datasets(config, logging.getLogger("sdxlpipe.inspect"), dict)
    if table is None:
        table = datasets[0].rows.slice(0, 0) if datasets else None
    return join(table, datasets), {d.index: f"{d.spec.partition('@')[0]}@{d.snapshot.id[:12]}" for d in datasets}


def _spread(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {"min": ordered[0], "median": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1]}


def _token_counts(config, captions: list[str]) -> tuple[list[int], str]:
    """CLIP tokens per caption (BOS/EOS excluded), from the model's own tokenizer when it is at hand."""
    try:
        tokenizer = _tokenizer(config.model)
    except Exception as e:  # noqa: BLE001 - token counts are a nicety; say why they are missing
        return [], f"no tokenizer ({type(e).__name__}: {e})"
    return [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in captions], "model"


def _tokenizer(model: str):
    if model == "tiny":
        from sdxlpipe.models.tiny_config import tiny_tokenizer

        return tiny_tokenizer()  # without torch: the report builds without it
    from transformers import CLIPTokenizer

    if Path(model).is_dir():
        return CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", local_files_only=True)
    return CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", local_files_only=True)


def format_inspect(result: dict[str, Any]) -> str:
    held = result["held_out"]["items"]
    lines = [f"{result['samples']} images" + (f" ({held} held out for the validation loss)" if held else "")
             + f", {result['samples_per_epoch']} samples per epoch (with repeats)", "", "sources:"]
    for name, s in result["sources"].items():
        origins = ", ".join(f"{k} {v}" for k, v in sorted(s["caption_from"].items()))
        lines.append(f"  {name:24} {s['images']:>6} images {s['samples_per_epoch']:>7} samples"
                     f"{'  (regularisation)' if s['is_reg'] else ''}{'  (validation)' if s['validation'] else ''}"
                     f"  captions from: {origins}")
    if result["rejected"]:
        lines += ["", f"rejected ({len(result['rejected'])}):"]
        lines += [f"  {r['path']}: {r['reason']}" for r in result["rejected"]]
    b = result["batch_size"]
    lines += ["", f"buckets (batch size {b}):"]
    for k in result["buckets"]:
        w, h = k["bucket"]
        short = f"  last batch short by {b - k['short_batch']} ({k['short_batch']} samples)" if k["short_batch"] else ""
        lines.append(f"  {w:>5} x {h:<5} {k['images']:>6} images {k['samples_per_epoch']:>7} samples "
                     f"{k['full_batches']:>6} full batches{short}")
    if result["samples_in_short_batches"]:
        lines.append(f"  {result['samples_in_short_batches']} samples per epoch land in short batches "
                     "(a drop-last trainer would skip them; raise repeats or merge buckets)")
    c = result["captions"]
    lines += ["", "captions:"]
    if c["words"]:
        lines.append(f"  words: min {c['words']['min']} median {c['words']['median']} max {c['words']['max']}")
    if c["tokens"]:
        lines.append(f"  tokens: min {c['tokens']['min']} median {c['tokens']['median']} p95 {c['tokens']['p95']} "
                     f"max {c['tokens']['max']}; {c['over_token_window']} over the {TOKEN_WINDOW}-token window")
    else:
        lines.append(f"  tokens: {c['tokenizer']}")
    if c["empty"]:
        lines.append(f"  {c['empty']} empty caption(s)")
    if result["top_tags"]:
        lines += ["", "top tags: " + ", ".join(f"{t} ({n})" for t, n in result["top_tags"])]
    return "\n".join(lines)
