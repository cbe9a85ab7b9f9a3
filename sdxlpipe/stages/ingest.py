"""Ingest: find the images, hash their bytes, check them, read their size.

Recipe: each source (a folder, a jsonl/csv/parquet manifest, or webdataset
tars) yields candidates -> content hash (files: the stat memo; tar members:
the tar's memo hash plus the member's offset) -> size, alpha and validity
from the last run when the hash is known, else from the image itself ->
bad files become `rejected` entries with a plain reason, exact duplicates
are kept once -> one row per good image. A no-op rerun reads no image bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import pyarrow as pa

VERSION = 2
# `source` (an absolute path) is left out: a moved dataset is not a changed one. So is `source_index`
# (the position of the row's [[sources]] entry, which training mixes by): reordering the entries
# changes no image, and a table from before the column does not count every row as changed.
OUTPUT_COLUMNS = ("content_hash", "width", "height", "repeats", "subset", "is_reg", "has_alpha",
                  "sidecar_caption", "caption_origin", "default_caption")
# Files between progress updates: often enough for a person, cheap on a no-op rerun of a million.
PROGRESS_EVERY = 64
# Rejected files of the last run, so a rerun answers them from the memo too.
REJECTED_TABLE = "ingest_rejected"


@dataclass(frozen=True)
class Source:
    # A folder (searched recursively), a .jsonl/.csv/.parquet manifest, or a .tar / folder of .tar shards.
    # Empty for kind = "dataset".
    path: str = field(default="", metadata={"path": True})
    # "auto" decides from the path: manifest by extension; webdataset for a .tar, or a folder with tars and
    # no loose images (img2dataset's NNNNN.tar + .parquet + _stats.json); else folder. "validation": read as
    # "auto" would, and held out of training: the validation loss is measured on these items
    # (train.validation_every_steps), never trained on. "dataset": a dataset published in a store
    # (`sdxlpipe dataset list`), trained on as it is: no image is read, nothing is encoded.
    kind: Literal["auto", "folder", "manifest", "webdataset", "validation", "dataset"] = "auto"
    # How many times each image counts per epoch (kohya's num_repeats).
    repeats: int = 1
    # Regularisation / class images (kohya's is_reg): trained on like the others, reported apart.
    is_reg: bool = False
    # Name of the subset in reports and export metadata; defaults to the folder or file name.
    # kind = "dataset": the published dataset's name, or NAME@SNAPSHOT to pin one snapshot.
    name: str = ""
    # kind = "dataset": the store it is published in, any path or fsspec URL (https://, s3://, ...); "": the
    # config's own store.
    store: str = field(default="", metadata={"url": True})
    # Read kohya's `<repeats>_<class tokens>/` folders: repeats and the fallback caption from the name.
    kohya_folders: bool = False
    # Manifest columns: the image path (relative to the manifest) and the caption.
    image_column: str = "image"
    caption_column: str = "text"
    # Fixed instance/class prompt for images with no caption (after sidecar, column and stem).
    prompt: str = ""
    # Use the file name (underscores as spaces) when there is no caption; off to fall back to `prompt`.
    stem_captions: bool = True
    # This source's share of every epoch, relative to the other sources' weights (MosaicML streaming's
    # `proportion`, SimpleTuner's `probability`): set it on every source or on none. An epoch keeps its
    # length (all sources' images x repeats) and each source fills weight / sum of weights of it, going
    # through all of its images before repeating one. 0 (unset): every image `repeats` times per epoch.
    weight: float = 0.0
    # Train on at most this many of this source's images: a seeded subset, the same for the whole run
    # (SimpleTuner's max_num_samples). 0: all of them.
    max_samples: int = 0


@dataclass(frozen=True)
class Params:
    sources: tuple[Source, ...] = ()
    # Decompression-bomb guard: 8K x 8K is far above any training resolution.
    max_pixels: int = 8192 * 8192


def check(p: Params) -> list[tuple[str, str]]:
    problems = []
    if not p.sources:
        problems.append(("sources", 'no image source; add [[sources]] path = "images" (or kind = "dataset")'))
    for i, s in enumerate(p.sources):
        where = f"sources[{i}]"
        if s.kind == "dataset":
            problems += _check_dataset_source(s, where)
            continue
        if s.store:
            problems.append((f"{where}.store", 'names the store of a published dataset: set kind = "dataset"'))
        if not s.path:
            problems.append((f"{where}.path", 'missing: the images\' folder, manifest or tars (or kind = "dataset")'))
            continue
        path = Path(s.path)
        if not path.exists():
            problems.append((f"{where}.path", f"does not exist: {s.path}"))
        elif source_kind(s) == "manifest" and not path.is_file():
            problems.append((f"{where}.path", f"a manifest must be a .jsonl, .csv or .parquet file: {s.path}"))
        elif source_kind(s) == "folder" and not path.is_dir():
            problems.append((f"{where}.path", f"not a folder (manifests end in .jsonl/.csv/.parquet, shards in .tar): {s.path}"))
        if s.repeats < 1:
            problems.append((f"{where}.repeats", "must be >= 1"))
        if s.weight < 0:
            problems.append((f"{where}.weight", "must be > 0 (or 0 on every source: no weighting)"))
        if s.max_samples < 0:
            problems.append((f"{where}.max_samples", "must be >= 0 (0: all of the source's images)"))
        if s.kind == "validation" and (s.weight or s.max_samples):
            problems.append((f"{where}.weight" if s.weight else f"{where}.max_samples",
                             'a kind = "validation" source is never trained on: weight and max_samples do not apply'))
    # Validation sources take no share of an epoch: the rule is about the sources that train.
    trained = [i for i, s in enumerate(p.sources) if s.kind != "validation"]
    unweighted = [i for i in trained if p.sources[i].weight <= 0]
    if unweighted and len(unweighted) < len(trained):
        problems.append((f"sources[{unweighted[0]}].weight",
                         "set weight on every [[sources]] entry or on none: a weight is a share relative to the others'"))
    if p.max_pixels < 1:
        problems.append(("ingest.max_pixels", "must be >= 1"))
    return problems


# Settings that shape an image source's rows; a published dataset's rows were shaped when it was encoded.
IMAGE_ONLY = ("repeats", "is_reg", "kohya_folders", "image_column", "caption_column", "prompt", "stem_captions")


def _check_dataset_source(s: Source, where: str) -> list[tuple[str, str]]:
    """A dataset source names a dataset; the image sources' settings are the dataset's own rows'."""
    from sdxlpipe.cache_format import StoreError
    from sdxlpipe.cache_format.snapshots import parse_spec

    problems = []
    if s.weight < 0:
        problems.append((f"{where}.weight", "must be > 0 (or 0 on every source: no weighting)"))
    if s.max_samples < 0:
        problems.append((f"{where}.max_samples", "must be >= 0 (0: all of the dataset's samples)"))
    try:
        parse_spec(s.name)
    except StoreError as e:
        problems.append((f"{where}.name", f"{e.what}; {e.hint}" if s.name else
                         "the published dataset to train on (`sdxlpipe dataset list --store URL` names them)"))
    if s.path:
        problems.append((f"{where}.path", "a dataset source reads no path: its store (`store`) holds everything"))
    images_only = {f.name: f.default for f in dataclasses.fields(Source) if f.name in IMAGE_ONLY}
    for name, default in images_only.items():
        if getattr(s, name) != default:
            problems.append((f"{where}.{name}", "applies to image sources; a published dataset's rows carry their own "
                                                "(publish it again with the setting changed)"))
    return problems


def reads_unlisted_files(p: Params) -> bool:
    """A manifest names image files anywhere, which no path setting lists, and a dataset source behind a URL
    changes without a trace here: the no-op record cannot cover either (a local store is a path setting)."""
    return any(source_kind(s) == "manifest" or (s.kind == "dataset" and "://" in s.store.removeprefix("file://"))
               for s in p.sources)


def source_kind(s: Source) -> str:
    """How a source is read: its kind, or for "auto" and "validation" what its path looks like."""
    if s.kind not in ("auto", "validation"):
        return s.kind
    from sdxlpipe.datasets.manifest import MANIFEST_EXTENSIONS
    from sdxlpipe.datasets.webdataset import looks_like_webdataset

    path = Path(s.path)
    if path.suffix.lower() in MANIFEST_EXTENSIONS:
        return "manifest"
    if path.suffix.lower() == ".tar":
        return "webdataset"
    if path.is_dir() and looks_like_webdataset(path):
        return "webdataset"
    return "folder"


SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("content_hash", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("repeats", pa.int32()),
    ("subset", pa.string()), ("is_reg", pa.bool_()), ("has_alpha", pa.bool_()),
    ("sidecar_caption", pa.string()), ("caption_origin", pa.string()), ("default_caption", pa.string()),
    ("container_hash", pa.string()), ("source_index", pa.int32()),
    # Held out of training (a kind = "validation" source; training/holdout.py). Not in OUTPUT_COLUMNS: a
    # table from before it would count every row as new, and a source made a validation one changes the
    # train stage's key (its samples), which `status` names.
    ("validation", pa.bool_()),
])
REJECTED_SCHEMA = pa.schema([
    ("path", pa.string()), ("source", pa.string()), ("content_hash", pa.string()),
    ("reason", pa.string()), ("container_hash", pa.string()),
])


def candidates(source: Source, tar_hash, read_sidecar=None) -> Iterator[tuple[object, str | None]]:
    """(candidate, container hash) for every image a source lists; read_sidecar(path, st): a caption file's text."""
    from sdxlpipe.datasets.folder import read_folder
    from sdxlpipe.datasets.manifest import read_manifest
    from sdxlpipe.datasets.webdataset import list_tars, read_tar

    path = Path(source.path)
    kind = source_kind(source)
    subset = source.name or (path.stem if path.is_file() else path.name)
    common = dict(subset=subset, repeats=source.repeats, prompt=source.prompt, stem_captions=source.stem_captions)
    if kind == "manifest":
        for c in read_manifest(path, image_column=source.image_column, caption_column=source.caption_column, **common):
            yield c, None
    elif kind == "webdataset":
        for tar in list_tars(path):
            digest = tar_hash(tar)
            prefix = "" if path.is_file() else tar.relative_to(path).as_posix() + "/"
            for c in read_tar(tar, rel_prefix=prefix, **common):
                yield c, digest
    else:
        for c in read_folder(path, kohya_folders=source.kohya_folders, read_sidecar=read_sidecar, **common):
            yield c, None


def run(table: pa.Table, params: Params, ctx) -> pa.Table:
    from sdxlpipe.datasets.open_image import ImageInfo, probe_image, read_source_bytes
    from sdxlpipe.datasets.sidecars import read_sidecar
    from sdxlpipe.pipeline.hashing import ContentMemo
    from sdxlpipe.pipeline.keys import xxh3_hex

    previous = ctx.previous_table("ingest")
    old_rejected = ctx.previous_table(REJECTED_TABLE)
    good, bad, member_hash = _known(previous, old_rejected)
    rows: dict[str, list] = {name: [] for name in SCHEMA.names}
    rejected: dict[str, list] = {name: [] for name in REJECTED_SCHEMA.names}
    seen: dict[str, str] = {}
    read_bytes = 0
    # Caption sidecar texts by file stat, so a rerun opens no caption file.
    sidecars = ContentMemo(ctx.workspace.sidecar_memo_path, compute=read_sidecar, column="text")

    def reject(c, digest, reason, container_hash):
        ctx.reject(c.display, reason)
        for name, value in zip(REJECTED_SCHEMA.names, (c.display, c.source, digest, reason, container_hash)):
            rejected[name].append(value)

    # The number of files is not known until every source is listed: progress counts files read.
    with ctx.reporter.track("ingest", None) as advance:
        for index, source in enumerate(params.sources):
            if source.kind == "dataset":
                continue  # its rows join the table at the publish point (pipeline/sources.py), read from the store
            listed = 0
            for c, container_hash in candidates(source, ctx.memo.hash_file, sidecars.get):
                listed += 1
                if listed % PROGRESS_EVERY == 0:
                    advance(PROGRESS_EVERY)
                if c.reject:
                    reject(c, None, c.reject, container_hash)
                    continue
                data = None
                if c.file is not None:
                    digest = ctx.memo.hash_file(c.file)
                else:
                    digest = member_hash.get((container_hash, c.source))
                    if digest is None:
                        data = read_source_bytes(c.source)
                        digest = xxh3_hex(data)
                info = good.get(digest) or bad.get(digest)
                if info is None:
                    info = probe_image(data if data is not None else c.file, params.max_pixels)
                    read_bytes += 1
                    if isinstance(info, ImageInfo) and info.notes:
                        ctx.log.info("%s: %s", c.display, "; ".join(info.notes))
                if isinstance(info, str):
                    reject(c, digest, info, container_hash)
                    continue
                if digest in seen:
                    # Listed with the rejects so a person sees it; `duplicate_of` tells --strict it is no error.
                    ctx.rejected.append({"path": c.display, "reason": f"duplicate: same bytes as {seen[digest]} (kept once)",
                                         "duplicate_of": seen[digest]})
                    ctx.log.info("duplicate image %s is the same file as %s: kept once", c.display, seen[digest])
                    continue
                seen[digest] = c.display
                values = {
                    # The sample's identity in the tables (not a cache key): subset + path inside the source.
                    "key": hashlib.blake2b(f"{c.subset}/{c.rel}".encode(), digest_size=8).hexdigest(),
                    "source": c.source, "content_hash": digest, "width": info.width, "height": info.height,
                    "repeats": c.repeats, "subset": c.subset, "is_reg": source.is_reg, "has_alpha": info.has_alpha,
                    "sidecar_caption": c.sidecar_caption, "caption_origin": c.caption_origin,
                    "default_caption": c.default_caption, "container_hash": container_hash, "source_index": index,
                    "validation": source.kind == "validation",
                }
                for name in SCHEMA.names:
                    rows[name].append(values[name])
            advance(listed % PROGRESS_EVERY)
            if not listed:
                from sdxlpipe.errors import UserError

                raise UserError(f"sources[{index}]: no image files in {source.path} (read as a {source_kind(source)} source)",
                                "point path at the images; for tar shards or a manifest elsewhere set "
                                "kind = \"webdataset\" or \"manifest\" in that [[sources]] entry")
            if (previous is None and source_kind(source) == "folder" and not source.kohya_folders
                    and _kohya_tree(Path(source.path))):  # first run only: the hint costs a directory scan
                ctx.log.info("%s holds kohya <repeats>_<name> folders: set kohya_folders = true in its [[sources]] entry "
                             "to take repeats and class tokens from their names", source.path)
    if not ctx.dry_run:  # `status` writes nothing, not even the hash memo
        ctx.memo.save()
        sidecars.save()
    ctx.log.debug("ingest probed %d image(s)", read_bytes)
    rejected_table = pa.table(rejected, schema=REJECTED_SCHEMA)
    # An equal table is not rewritten: a no-op run writes nothing (decision 35).
    if not ctx.dry_run and (old_rejected is None or not old_rejected.equals(rejected_table)):
        ctx.workspace.write_table(REJECTED_TABLE, rejected_table)
    return pa.table(rows, schema=SCHEMA)


def _kohya_tree(folder: Path) -> bool:
    from sdxlpipe.datasets.folder import KOHYA_FOLDER

    import os

    with os.scandir(folder) as entries:
        subdirs = [e.name for e in entries if not e.name.startswith(".") and e.is_dir()]
    return bool(subdirs) and all(KOHYA_FOLDER.match(name) for name in subdirs)


def _known(previous: pa.Table | None, rejected: pa.Table | None):
    """From the last run: content hash -> ImageInfo or reject reason, and (tar hash, member) -> content hash."""
    from sdxlpipe.datasets.open_image import ImageInfo

    good: dict[str, ImageInfo] = {}
    bad: dict[str, str] = {}
    member_hash: dict[tuple[str, str], str] = {}
    if previous is not None and {"has_alpha", "container_hash"} <= set(previous.column_names):
        d = previous.select(["content_hash", "width", "height", "has_alpha", "source", "container_hash"]).to_pydict()
        for h, w, hh, a, src, ch in zip(*d.values()):
            good[h] = ImageInfo(w, hh, a)
            if ch:
                member_hash[(ch, src)] = h
    if rejected is not None and set(REJECTED_SCHEMA.names) <= set(rejected.column_names):
        for r in rejected.to_pylist():
            if r["content_hash"]:
                bad[r["content_hash"]] = r["reason"]
                if r["container_hash"]:
                    member_hash[(r["container_hash"], r["source"])] = r["content_hash"]
    return good, bad, member_hash
