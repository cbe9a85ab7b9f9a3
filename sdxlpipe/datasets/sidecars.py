"""Caption files beside an image: kohya `.txt`/`.caption`, EveryDream `.yaml`, `.json`.

EveryDream's yaml holds a main prompt plus tags; the caption is the main
prompt followed by the tags, joined with ", ". A json sidecar may hold
`caption`/`text` (img2dataset, HF) or EveryDream's keys.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Callable

# Checked in this order; the first that exists wins.
SIDECAR_EXTENSIONS = (".txt", ".caption", ".yaml", ".yml", ".json")


def find_sidecar(image: Path, read: Callable[..., str | None] | None = None) -> str | None:
    """The caption of the first sidecar that exists. `read(path, st)`: how to get its text
    (ingest passes its stat-keyed memo, so a rerun opens no caption file); default: read it."""
    for ext in SIDECAR_EXTENSIONS:
        side = image.with_suffix(ext)
        try:
            st = os.stat(side)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if stat.S_ISREG(st.st_mode):
            return read(side, st) if read is not None else read_sidecar(side)
    return None


def read_sidecar(path: Path) -> str | None:
    text = path.read_text(encoding="utf-8", errors="replace")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".caption"):
        return text.strip()
    try:
        if suffix == ".json":
            doc = json.loads(text)
        else:
            import yaml

            doc = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - a broken sidecar must not stop ingest; say so and fall back
        import logging

        logging.getLogger("sdxlpipe.ingest").warning("caption file %s is not valid %s (%s): ignored", path, suffix[1:], e)
        return None
    return caption_from_doc(doc)


def caption_from_doc(doc: Any) -> str | None:
    if isinstance(doc, str):
        return doc.strip()
    if not isinstance(doc, dict):
        return None
    for key in ("caption", "text", "prompt"):
        if isinstance(doc.get(key), str) and doc[key].strip():
            return doc[key].strip()
    main = doc.get("main_prompt")
    tags = []
    for tag in doc.get("tags") or []:
        if isinstance(tag, dict):
            tag = tag.get("tag")
        if isinstance(tag, str) and tag.strip():
            tags.append(tag.strip())
    parts = ([main.strip()] if isinstance(main, str) and main.strip() else []) + tags
    return ", ".join(parts) if parts else None
