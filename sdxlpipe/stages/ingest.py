"""Ingest: find the images, hash their bytes, read their size.

Recipe: walk each source folder (sorted, recursive) -> content hash from
the stat memo -> size and validity from the previous table when the hash is
known, else from the image header -> drop exact duplicates -> one row per
image. A no-op rerun reads no image bytes.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

VERSION = 1
# `source` (an absolute path) is left out: a moved dataset is not a changed one.
OUTPUT_COLUMNS = ("content_hash", "width", "height", "repeats", "subset", "sidecar_caption")

# What PIL decodes and SDXL users actually ship.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_EXTENSIONS = (".txt", ".caption")


@dataclass(frozen=True)
class Source:
    path: str = field(metadata={"path": True})
    # How many times each image counts per epoch (kohya's num_repeats).
    repeats: int = 1
    # Name of the subset in reports and export metadata; defaults to the folder name.
    name: str = ""


@dataclass(frozen=True)
class Params:
    sources: tuple[Source, ...] = ()
    # Decompression-bomb guard: 8K x 8K is far above any training resolution.
    max_pixels: int = 8192 * 8192


def check(p: Params) -> list[tuple[str, str]]:
    problems = []
    if not p.sources:
        problems.append(("sources", 'no image source; add [[sources]] path = "images"'))
    for i, s in enumerate(p.sources):
        if not Path(s.path).is_dir():
            problems.append((f"sources[{i}].path", f"not a folder: {s.path}"))
        if s.repeats < 1:
            problems.append((f"sources[{i}].repeats", "must be >= 1"))
    return problems


SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("content_hash", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("repeats", pa.int32()),
    ("subset", pa.string()), ("sidecar_caption", pa.string()),
])


def run(table: pa.Table, params: Params, ctx) -> pa.Table:
    known = _known_sizes(ctx.previous_table("ingest"))
    rows: dict[str, list] = {name: [] for name in SCHEMA.names}
    seen: dict[str, str] = {}
    for source in params.sources:
        root = Path(source.path)
        subset = source.name or root.name
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
            digest = ctx.memo.hash_file(path)
            size = known.get(digest) or _read_size(path, params.max_pixels)
            if isinstance(size, str):
                ctx.reject(str(path), size)
                continue
            if digest in seen:
                ctx.log.info("duplicate image %s is the same file as %s: kept once", path, seen[digest])
                continue
            seen[digest] = str(path)
            rel = path.relative_to(root).as_posix()
            values = {
                # The sample's identity in the tables (not a cache key): subset + relative path.
                "key": hashlib.blake2b(f"{subset}/{rel}".encode(), digest_size=8).hexdigest(),
                "source": str(path), "content_hash": digest, "width": size[0], "height": size[1],
                "repeats": source.repeats, "subset": subset, "sidecar_caption": _sidecar(path),
            }
            for name in SCHEMA.names:
                rows[name].append(values[name])
    ctx.memo.save()
    return pa.table(rows, schema=SCHEMA)


def _known_sizes(previous: pa.Table | None) -> dict[str, tuple[int, int]]:
    if previous is None:
        return {}
    d = previous.select(["content_hash", "width", "height"]).to_pydict()
    return {h: (w, hh) for h, w, hh in zip(d["content_hash"], d["width"], d["height"])}


def _read_size(path: Path, max_pixels: int) -> tuple[int, int] | str:
    """(width, height) after EXIF orientation, or the reason the file is unusable."""
    from PIL import Image, UnidentifiedImageError

    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    return f"{w}x{h} is more than ingest.max_pixels={max_pixels}; raise it if the image is real"
                orientation = im.getexif().get(0x0112, 1)
                im.load()  # decodes the whole image: catches truncated files now, not mid-encode
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"not a readable image ({type(e).__name__}: {e})"
    except (OSError, SyntaxError, ValueError) as e:
        return f"damaged image ({e})"
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _sidecar(path: Path) -> str | None:
    for ext in CAPTION_EXTENSIONS:
        side = path.with_suffix(ext)
        if side.exists():
            return side.read_text(encoding="utf-8", errors="replace").strip()
    return None
