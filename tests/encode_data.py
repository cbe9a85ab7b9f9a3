"""A small dataset for the encode tests: a few images in three buckets, captions, a config."""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image

COLOURS = [(230, 40, 40), (40, 200, 60), (40, 70, 220), (240, 200, 30), (150, 40, 180), (20, 190, 190),
           (250, 140, 20), (90, 90, 90), (200, 200, 250), (10, 10, 10), (120, 60, 30), (255, 255, 255)]
# (width, height): squares, landscapes and portraits, so three buckets.
SIZES = [(64, 64), (96, 64), (64, 96), (80, 80)]

CONFIG = """model = "tiny"

[[sources]]
path = "images"

[bucket]
resolution = 64
step = 32
min_side = 32
max_side = 128

[vae_encode]
batch_size = 4
workers = 0
{extra}
"""


def make_dataset(root: Path, count: int = 12, store: str | None = None, extra: str = "") -> Path:
    """`count` images (caption = colour name, a few repeated) under root/images; returns the config."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        colour = COLOURS[i % len(COLOURS)]
        w, h = SIZES[i % len(SIZES)]
        im = Image.new("RGB", (w, h), colour)
        for x in range(0, w, 16):  # a stripe, so a flipped image differs from the original
            im.putpixel((x, (x * 3 + i) % h), (255 - colour[0], 255 - colour[1], 255 - colour[2]))
        im.paste((255, 255, 255), (0, 0, w // 4, h))
        im.save(images / f"{i:03d}.png")
        # Captions repeat: texts used by many rows are encoded once.
        (images / f"{i:03d}.txt").write_text(f"a shape number {i % 5}\n")
    if store is not None:
        extra = f'[store]\nurl = "{store}"\n' + extra
    config = root / "sdxlpipe.toml"
    config.write_text(CONFIG.format(extra=extra))
    return config


def copy_dataset(src: Path, dest: Path) -> Path:
    """The dataset without its workspace, at another path, with fresh mtimes."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".sdxlpipe"))
    return dest / "sdxlpipe.toml"


def payloads(store_url: str, stage: str) -> dict[str, bytes]:
    """Every present item of a stage: key -> payload bytes (checked)."""
    from sdxlpipe.cache_format import open_store

    store = open_store(store_url, create=False)
    keys = sorted(store.present(stage))
    return dict(store.read_many(stage, keys))


def tar_members(store_dir: Path, stage: str) -> list[str]:
    """Member names of every shard file of a stage, as they are on disk."""
    import tarfile

    names = []
    for tar in sorted((store_dir / "shards" / stage).glob("*.tar")):
        with tarfile.open(tar) as t:
            names += t.getnames()
    return names
