"""webdataset tars as img2dataset writes them, read in place (never unpacked).

A sample is the members sharing a key (the name up to the first dot):
`000000012.jpg` + `000000012.txt` + `000000012.json`. The caption comes from
the `.txt` member, else the json's `caption`. Images are referenced by their
byte offset in the tar, so the encode stage reads one member with one seek, and a rerun on an
unchanged tar reads its headers and captions but no image bytes.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Iterator

from sdxlpipe.datasets.base import IMAGE_EXTENSIONS, Candidate, fallback_caption
from sdxlpipe.datasets.open_image import tar_source
from sdxlpipe.datasets.sidecars import caption_from_doc
from sdxlpipe.errors import UserError


def looks_like_webdataset(folder: Path) -> bool:
    """img2dataset output (`00000.tar` + `00000.parquet` + `00000_stats.json`, or any tar shards):
    tars at the top and no loose images beside them. Other files (parquet, json, logs) are ignored."""
    has_tar = False
    with os.scandir(folder) as entries:  # names only, no stat: a flat folder of a million images stops at once
        for entry in entries:
            suffix = os.path.splitext(entry.name)[1].lower()
            if entry.name.startswith("."):
                continue
            if suffix in IMAGE_EXTENSIONS:
                return False
            has_tar = has_tar or suffix == ".tar"
    return has_tar


def list_tars(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.tar") if p.is_file())


def read_tar(tar_path: Path, *, subset: str, repeats: int, prompt: str, stem_captions: bool,
             rel_prefix: str) -> Iterator[Candidate]:
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(tar_path, "r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                name = member.name
                folder, _, base = name.rpartition("/")
                key, dot, ext = base.partition(".")
                if not dot:
                    continue
                groups.setdefault(f"{folder}/{key}" if folder else key, {})["." + ext.lower()] = member
    except tarfile.ReadError as e:
        raise UserError(f"{tar_path}: not an uncompressed tar ({e})",
                        "webdataset sources must be plain .tar files (img2dataset's default); decompress .tar.gz first")
    with open(tar_path, "rb") as f:
        def read(member: tarfile.TarInfo) -> bytes:
            f.seek(member.offset_data)
            return f.read(member.size)

        for key, members in groups.items():
            image_ext = next((e for e in members if e in IMAGE_EXTENSIONS), None)
            if image_ext is None:
                continue
            image = members[image_ext]
            caption, origin = None, ""
            if ".txt" in members:
                caption, origin = read(members[".txt"]).decode("utf-8", "replace").strip(), "sidecar"
            elif ".json" in members:
                try:
                    caption = caption_from_doc(json.loads(read(members[".json"])))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    caption = None
                origin = "column" if caption else ""
            default, fallback_origin = fallback_caption(Path(key).name, prompt, stem_captions)
            yield Candidate(
                rel=f"{rel_prefix}{image.name}", display=f"{tar_path}/{image.name}",
                source=tar_source(tar_path, image.offset_data, image.size), subset=subset, repeats=repeats,
                sidecar_caption=caption or None, caption_origin=origin if caption else fallback_origin,
                default_caption=default, container=str(tar_path.absolute()),
            )
