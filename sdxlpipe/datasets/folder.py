"""A folder of images, searched recursively, with kohya and EveryDream conventions.

- kohya DreamBooth: a top-level `<repeats>_<class tokens>/` folder gives its
  images that many repeats, and the class tokens as the caption of an image
  without a caption file (when `kohya_folders` is on).
- EveryDream: `multiply.txt` in a folder (or any folder above it, inside the
  source) multiplies the repeats of the images below it.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterator

from sdxlpipe.datasets.base import IMAGE_EXTENSIONS, Candidate, fallback_caption
from sdxlpipe.datasets.sidecars import find_sidecar

KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")
log = logging.getLogger("sdxlpipe.ingest")


def list_images(root: Path) -> list[Path]:
    """Image files under `root`, sorted, skipping hidden folders (a workspace may live inside)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                found.append(Path(dirpath) / name)
    return found


def read_folder(root: Path, *, subset: str, repeats: int, kohya_folders: bool, prompt: str,
                stem_captions: bool, read_sidecar: Callable | None = None) -> Iterator[Candidate]:
    """read_sidecar(path, st): a caption file's text (ingest's stat-keyed memo); default: read it."""
    multipliers: dict[Path, float] = {}
    for path in list_images(root):
        rel = path.relative_to(root)
        item_subset, item_repeats, item_prompt, use_stem = subset, repeats, prompt, stem_captions
        if kohya_folders:
            use_stem = False  # kohya's rule: no caption file -> the folder's class tokens
            m = KOHYA_FOLDER.match(rel.parts[0]) if len(rel.parts) > 1 else None
            if m:
                item_subset, item_repeats = rel.parts[0], repeats * int(m.group(1))
                item_prompt = prompt or m.group(2).replace("_", " ")
            else:
                log.warning("%s is not inside a <repeats>_<name> folder: kept with repeats=%d", path, repeats)
        factor = _multiplier(path.parent, root, multipliers)
        if factor != 1.0:
            item_repeats = max(1, round(item_repeats * factor))
        sidecar = find_sidecar(path, read_sidecar)
        default, origin = fallback_caption(path.stem, item_prompt, use_stem)
        yield Candidate(
            rel=rel.as_posix(), display=str(path), source=str(path.absolute()), subset=item_subset,
            repeats=item_repeats, sidecar_caption=sidecar, caption_origin="sidecar" if sidecar is not None else origin,
            default_caption=default, file=path,
        )


def _multiplier(folder: Path, root: Path, memo: dict[Path, float]) -> float:
    """EveryDream's multiply.txt: the nearest one at or above `folder`, inside `root`."""
    if folder in memo:
        return memo[folder]
    value = 1.0
    f = folder / "multiply.txt"
    if f.is_file():
        try:
            value = float(f.read_text().strip())
        except ValueError:
            log.warning("%s does not hold a number: ignored", f)
        else:
            if value != int(value):
                log.warning("%s: %s is rounded to whole repeats (%d)", f, value, max(1, round(value)))
    elif folder != root and root in folder.parents:
        value = _multiplier(folder.parent, root, memo)
    memo[folder] = value
    return value
