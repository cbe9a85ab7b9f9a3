"""What every source reader yields: one `Candidate` per image it found.

Ingest turns candidates into rows: it hashes the bytes (through the stat
memo for files), probes the image, drops duplicates and rejects bad files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# What PIL decodes and SDXL users actually ship.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class Candidate:
    rel: str                 # path inside the source: the sample's identity and what reports show
    display: str             # the path a person recognises (absolute file, or shard.tar/member)
    source: str              # what `open_source_image` opens
    subset: str
    repeats: int
    sidecar_caption: str | None = None
    caption_origin: str = ""  # sidecar | column | stem | prompt | "" (none)
    default_caption: str = ""  # stem or instance prompt, used when there is no caption
    file: Path | None = None  # a real file, hashed through the stat memo
    data: bytes | None = None  # bytes already read (tar members)
    container: str | None = None  # the tar this came from
    reject: str | None = None  # known bad before reading (e.g. a manifest row whose file is missing)


def fallback_caption(stem: str, prompt: str, use_stem: bool) -> tuple[str, str]:
    """(caption, origin) for an image with no sidecar or column caption."""
    if use_stem and stem:
        return stem.replace("_", " ").strip(), "stem"
    if prompt:
        return prompt, "prompt"
    return "", ""
