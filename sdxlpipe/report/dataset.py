"""The Dataset page's data: `inspect`'s summary, every item in chunks, the rejects, the facets.

What the browser loads before first paint (`summary`) is bounded whatever the
dataset's size: counts, the bucket list, histograms, the top tags. The items
are records in chunks of `CHUNK` (the page loads the chunk it shows, and scans
chunks when a filter is set); `facets` says which chunks hold each bucket,
subset, source and top tag, so a filter reads only the chunks that can match.

An item record is a list (smaller than an object per item), in the order of
`ITEM_FIELDS`; the page script names them the same way.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Items per data file: ~100-150 KB of JS at typical caption lengths, read in ~10 ms by a browser.
CHUNK = 500
# Tags the facet index covers (by frequency); rarer ones are found by scanning every chunk.
FACET_TAGS = 300
# Bins of the caption length histogram.
LENGTH_BINS = 20

ITEM_FIELDS = ("key", "thumb", "width", "height", "caption", "variants", "bucket", "resize_w", "resize_h",
               "crop_left", "crop_top", "repeats", "subset", "source", "is_reg", "caption_from", "path", "held_out")
REJECT_FIELDS = ("path", "reason", "thumb", "duplicate_of")


@dataclass
class DatasetData:
    summary: dict[str, Any]
    items: list[list]  # chunks of ITEM_FIELDS records
    rejects: list[list]  # chunks of REJECT_FIELDS records
    facets: dict[str, Any]
    thumbs: dict[str, str]  # thumbnail key -> image source, for every item and reject with an image
    inspect: dict[str, Any]  # what `inspect --json` prints


def collect(config, batch_size: int | None = None) -> DatasetData:
    """Run the data stages (cached, as `inspect` does) and lay out what the Dataset page shows."""
    from sdxlpipe.datasets.inspect import inspect_dataset
    from sdxlpipe.pipeline.workspace import Workspace
    from sdxlpipe.report.thumbs import thumb_key
    from sdxlpipe.training.holdout import held_out_mask

    result = inspect_dataset(config, batch_size)
    workspace = Workspace(config.workspace)
    table = workspace.read_table("bucket")
    rows = table.to_pylist() if table is not None else []
    separator = getattr(config.params.get("caption"), "separator", ",")
    sources = config.params["ingest"].sources
    base = Path(config.base_dir)

    buckets = [tuple(b["bucket"]) for b in result["buckets"]]
    bucket_index = {b: i for i, b in enumerate(buckets)}
    subsets = list(result["sources"])
    subset_index = {s: i for i, s in enumerate(subsets)}
    # A dataset source has no path here: it is labelled by what names it, the dataset and its store.
    source_labels = [f"dataset {s.name} ({s.store or 'this store'})" if s.kind == "dataset" else _short(Path(s.path), base)
                     for s in sources]
    thumbs: dict[str, str] = {}
    held = held_out_mask(table, getattr(config.params.get("train"), "validation_split", 0.0)) if table is not None else []
    records = []
    for r, h in zip(rows, held):
        thumb = thumb_key(r["content_hash"])
        thumbs[thumb] = r["source"]
        variants = [v for v in (r.get("caption_variants") or []) if v != r["caption"]]
        records.append([
            r["key"], thumb, r["width"], r["height"], r["caption"], variants,
            bucket_index[(r["bucket_w"], r["bucket_h"])], r["resize_w"], r["resize_h"], r["crop_left"], r["crop_top"],
            r["repeats"], subset_index[r["subset"]], _source_of(r, sources), int(bool(r["is_reg"])),
            r.get("caption_origin") or "", _display(r["source"], base), int(h),
        ])
    items = [records[i:i + CHUNK] for i in range(0, len(records), CHUNK)]
    rejects = _rejects(result["rejected"], workspace.read_table("ingest_rejected"), rows, thumbs, base)

    vae = config.params.get("vae_encode")
    summary = {
        "inspect": {**result, "rejected": len(result["rejected"])},
        "items": len(records), "chunk": CHUNK, "chunks": len(items),
        "rejected": len(result["rejected"]), "reject_chunks": len(rejects),
        "buckets": [list(b) for b in buckets], "subsets": subsets,
        "sources": [{"label": label, "kind": s.kind, "repeats": s.repeats, "is_reg": s.is_reg}
                    for label, s in zip(source_labels, sources)],
        "source_images": _count(records, 13, len(sources)),
        "separator": separator, "flip": bool(getattr(vae, "flip_aug", False)),
        "caption_words": _histogram([len(r[4].split()) for r in records]),
        "fields": list(ITEM_FIELDS), "reject_fields": list(REJECT_FIELDS),
    }
    facets = _facets(records, separator, len(buckets), len(subsets), len(sources))
    return DatasetData(summary, items, rejects, facets, thumbs, result)


def drop_thumbs(data: DatasetData, failed: set[str]) -> None:
    """Records whose image gave no thumbnail name none, so the page shows why instead of a broken image."""
    if not failed:
        return
    for chunks, field in ((data.items, ITEM_FIELDS.index("thumb")), (data.rejects, REJECT_FIELDS.index("thumb"))):
        for chunk in chunks:
            for record in chunk:
                if record[field] in failed:
                    record[field] = ""


def _rejects(listed: list[dict], table, rows: list[dict], thumbs: dict[str, str], base: Path) -> list[list]:
    """Reject records in chunks; a thumbnail where the file opens (too small, duplicate, odd size...)."""
    from sdxlpipe.report.thumbs import thumb_key

    known = {}  # display path -> (file, content hash) from ingest's rejected table
    if table is not None:
        for r in table.select(["path", "source", "content_hash"]).to_pylist():
            known[r["path"]] = (r["source"], r["content_hash"])
    kept = {r["source"]: r["content_hash"] for r in rows}
    out = []
    for r in listed:
        source, digest = known.get(r["path"], (None, None))
        if "duplicate_of" in r:
            # The same bytes as a kept image: its thumbnail.
            source = next((s for s in (r["duplicate_of"], str(Path(r["duplicate_of"]).absolute())) if s in kept), None)
            digest = kept.get(source) if source else None
        thumb = ""
        if source and digest:
            thumb = thumb_key(digest)
            thumbs.setdefault(thumb, source)
        out.append([_display(r["path"], base), r["reason"], thumb, _display(r.get("duplicate_of") or "", base)])
    return [out[i:i + CHUNK] for i in range(0, len(out), CHUNK)]


def _facets(records: list[list], separator: str, buckets: int, subsets: int, sources: int) -> dict[str, Any]:
    """For each bucket, subset, source and frequent tag: the chunks that hold it (ascending)."""
    from sdxlpipe.datasets.tags import split_tags

    def chunks_of(field: int, n: int) -> list[list[int]]:
        found: list[set[int]] = [set() for _ in range(n)]
        for i, r in enumerate(records):
            if 0 <= r[field] < n:
                found[r[field]].add(i // CHUNK)
        return [sorted(s) for s in found]

    tag_chunks: dict[str, set[int]] = {}
    counts: Counter = Counter()
    for i, r in enumerate(records):
        for t in set(split_tags(r[4], separator)):
            counts[t] += 1
            tag_chunks.setdefault(t, set()).add(i // CHUNK)
    top = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:FACET_TAGS]]
    return {"bucket": chunks_of(6, buckets), "subset": chunks_of(12, subsets), "source": chunks_of(13, sources),
            "tags": {t: sorted(tag_chunks[t]) for t in top}, "tag_counts": {t: counts[t] for t in top}}


def _source_of(row: dict, sources) -> int:
    """Which [[sources]] entry a row came from: ingest's `source_index`; for a table from before it, the
    entry whose folder or file holds the row, else the one of its subset name."""
    if row.get("source_index") is not None:
        return row["source_index"]
    where = row["source"].rsplit(":", 1)[-1] if row["source"].startswith("tar:") else row["source"]
    best, best_len = -1, -1
    for i, s in enumerate(sources):
        root = str(s.path).rstrip("/")
        if (where == root or where.startswith(root + "/")) and len(root) > best_len:
            best, best_len = i, len(root)
    if best >= 0:
        return best
    for i, s in enumerate(sources):  # a manifest whose images live elsewhere
        if row["subset"] == (s.name or Path(s.path).stem):
            return i
    return -1


def _count(records: list[list], field: int, n: int) -> list[int]:
    counts = [0] * n
    for r in records:
        if 0 <= r[field] < n:
            counts[r[field]] += 1
    return counts


def _histogram(values: list[int]) -> dict[str, Any]:
    """Counts in LENGTH_BINS equal bins from 0 to the maximum: {"width", "counts"}."""
    if not values:
        return {"width": 1, "counts": []}
    width = max(1, math.ceil((max(values) + 1) / LENGTH_BINS))
    counts = [0] * (max(values) // width + 1)
    for v in values:
        counts[v // width] += 1
    return {"width": width, "counts": counts}


def _short(path: Path | str, base: Path) -> str:
    """Relative to `base` when inside it (string operations: this runs once per item)."""
    text, root = str(path), str(base).rstrip("/") + "/"
    return text[len(root):] if text.startswith(root) else ("." if text == root[:-1] else text)


def _display(source: str, base: Path) -> str:
    """A file as a person recognises it: relative to the config's folder when inside it; `tar:` refs as
    the shard's path and the member's offset."""
    if source.startswith("tar:"):
        offset, _, path = source[4:].split(":", 2)
        return f"{_short(path, base)} @ {offset}"
    return _short(source, base)
