"""Thumbnails of the dataset's images, cached by content key.

A thumbnail's name is the xxh3 of what shapes it (the image's content hash,
the side, this module's and `open_image`'s versions), so it never goes stale
and a second report makes only the thumbnails of new images. The cache lives
in the workspace (`.sdxlpipe/thumbs/<2 hex>/<key>.jpg`); a report's site gets
hard links to it (copies across filesystems), so the site stays
self-contained and a site rebuilt in place costs one directory scan.

Thumbnails are made in worker processes (decoding is the whole cost) and
written temp file + rename without an fsync: they are a cache of derived
pixels, an fsync per file costs ~6 ms (10 minutes at 100k images on this
machine's disk), and a file a crash leaves empty is made again (an empty
file is never reused).
"""

from __future__ import annotations

import io
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

from sdxlpipe.pipeline.keys import item_key

VERSION = 1  # bump when a change here alters the thumbnail pixels
# Longest side in pixels: sharp in a 180 px gallery cell on a 2x display; ~8 KB as JPEG.
SIDE = 256
# JPEG quality: 80 keeps shapes and text legible at a third of q95's bytes.
QUALITY = 80
# Fewer thumbnails than this are made in this process: starting workers costs more.
POOL_MIN = 48
# Thumbnails per worker task: big enough to amortise the call, small enough to balance.
TASK = 32


def thumb_key(content_hash: str) -> str:
    from sdxlpipe.datasets.open_image import VERSION as OPEN_VERSION

    return item_key({"thumb": VERSION, "content": content_hash, "side": SIDE, "quality": QUALITY,
                     "open_image": OPEN_VERSION})


def relpath(key: str) -> str:
    """Where a thumbnail lies under a thumbs folder (and under the site's `thumbs/`)."""
    return f"{key[:2]}/{key}.jpg"


def present(root: Path) -> set[str]:
    """Keys of the non-empty thumbnails under `root`."""
    return scan(root)[0]


def scan(root: Path) -> tuple[set[str], set[str]]:
    """(keys of the non-empty thumbnails, keys of the images that gave none) under `root`: one scandir per
    prefix folder, no stat per file beyond the one scandir gives."""
    found: set[str] = set()
    failed: set[str] = set()
    if not root.is_dir():
        return found, failed
    with os.scandir(root) as prefixes:
        for prefix in prefixes:
            if not prefix.is_dir() or len(prefix.name) != 2:
                continue
            with os.scandir(prefix.path) as files:
                for f in files:
                    if f.name.startswith("."):
                        continue
                    if f.name.endswith(".jpg") and f.stat().st_size > 0:
                        found.add(f.name[:-4])
                    elif f.name.endswith(".failed"):
                        failed.add(f.name[:-7])
    return found, failed


def make_missing(jobs: dict[str, str], cache: Path, advance: Callable[[int], None] = lambda n: None,
                 workers: int | None = None) -> dict[str, str]:
    """Make the thumbnail of each {key: source} not yet in `cache`; returns {key: reason} of those that failed.

    A source is what `open_image.read_source_bytes` reads (a path or a `tar:` reference). An image that
    gives no thumbnail is remembered (`<key>.failed`, its reason): the same bytes fail the same way, so a
    second report does not decode a broken file again.
    """
    have, known_bad = scan(cache)
    failed = {k: _reason(cache, k) for k in jobs if k in known_bad and k not in have}
    todo = [(k, s) for k, s in jobs.items() if k not in have and k not in known_bad]
    if not todo:
        return failed
    tasks = [todo[i:i + TASK] for i in range(0, len(todo), TASK)]
    workers = workers or min(os.cpu_count() or 1, 8)
    if len(todo) < POOL_MIN or workers < 2:
        for task in tasks:
            failed.update(_make_many(task, str(cache)))
            advance(len(task))
        return failed
    import multiprocessing

    # spawn, not fork: the parent holds pyarrow's threads, and a forked child can inherit a held lock.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for task, result in zip(tasks, pool.map(_make_many, tasks, [str(cache)] * len(tasks))):
            failed.update(result)
            advance(len(task))
    return failed


def _reason(cache: Path, key: str) -> str:
    try:
        return (cache / f"{key[:2]}/{key}.failed").read_text()
    except OSError:
        return "the image could not be read"


def _make_many(task: list[tuple[str, str]], cache: str) -> dict[str, str]:
    failed = {}
    for key, source in task:
        path = os.path.join(cache, relpath(key))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            data = render(source)
        except FileNotFoundError as e:
            failed[key] = f"{e.strerror}: {e.filename}"  # gone since ingest: not the bytes' fault, not remembered
            continue
        except Exception as e:  # noqa: BLE001 - a rejected file may be anything; its card says why
            failed[key] = f"{type(e).__name__}: {e}"
            path, data = path[:-len(".jpg")] + ".failed", failed[key].encode()
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return failed


def render(source: str) -> bytes:
    """The JPEG bytes of one thumbnail: upright RGB as training sees it (alpha on white), longest side SIDE."""
    import warnings

    from PIL import Image

    from sdxlpipe.datasets.open_image import TAR_PREFIX, read_source_bytes, to_rgb

    fp = io.BytesIO(read_source_bytes(source)) if source.startswith(TAR_PREFIX) else source
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(fp) as im:
            # JPEG decodes at 1/2..1/8 scale in the DCT: most of the speed of a thumbnail.
            im.draft("RGB", (SIDE * 2, SIDE * 2))
            rgb = to_rgb(im).convert("RGB")
    rgb.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=QUALITY, optimize=True)
    return out.getvalue()


def link_into(keys: Iterable[str], cache: Path, site: Path) -> int:
    """Put each cached thumbnail under `site` (hard link, else copy); removes the site's thumbnails not
    in `keys`. Returns how many were added."""
    wanted = set(keys)
    have = present(site)
    added = 0
    for key in wanted - have:
        src, dest = cache / relpath(key), site / relpath(key)
        if not src.exists():
            continue  # its image failed to open: the card says why
        dest.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(dest):
            os.remove(dest)  # an empty leftover of a killed build
        try:
            os.link(src, dest)
        except OSError:
            shutil.copyfile(src, dest)  # another filesystem, or one without hard links
        added += 1
    for key in have - wanted:
        os.remove(site / relpath(key))
    return added
