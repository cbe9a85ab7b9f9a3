"""Datasets for the report's tests: real image files with tag captions, kohya subsets, a broken file
and a duplicate, at any size (numpy pixels, so a thousand images take a second)."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = [(64, 48), (48, 64), (64, 64), (96, 48), (40, 40)]
TAGS = ["outdoors", "indoors", "sky", "grass", "sofa", "lamp", "window", "ball", "running", "sitting", "night",
        "snow", "beach", "forest", "smile"]
CONFIG = """model = "tiny"
[[sources]]
path = "data"
kohya_folders = true
[[sources]]
path = "extra"
name = "extra"
[caption]
variants = 2
shuffle_tags = true
keep_tokens = 1
[bucket]
resolution = 64
step = 32
min_side = 32
max_side = 128
"""


def make_dataset(root: Path, images: int, seed: int = 0) -> Path:
    """`images` trainable images (plus one broken file and one duplicate) and the config; returns the config.

    Three quarters go to the kohya folders `3_sks dog` and `1_cat` (tag captions in .txt files), the rest
    to `extra/` (captions from the file names).
    """
    rng = random.Random(seed)
    arrays = np.random.default_rng(seed)
    for i in range(images):
        if i % 4 == 3:
            folder, caption = root / "extra", None
        else:
            folder = root / "data" / ("3_sks dog" if i % 4 != 2 else "1_cat")
            caption = ", ".join([folder.name.split("_", 1)[1]] + rng.sample(TAGS, 4))
        write_image(folder / f"img{i:05d}.png", SIZES[i % len(SIZES)], arrays)
        if caption:
            (folder / f"img{i:05d}.txt").write_text(caption)
    (root / "data" / "3_sks dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    shutil.copy(root / "data" / "3_sks dog" / "img00000.png", root / "extra" / "copy of img00000.png")
    config = root / "sdxlpipe.toml"
    config.write_text(CONFIG)
    return config


def write_image(path: Path, size: tuple[int, int], arrays) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = arrays.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).resize(size, Image.Resampling.NEAREST).save(path)
    return path


def read_data(site: Path, name: str):
    """The value a data/NAME.js file of the site puts."""
    text = (site / "data" / f"{name}.js").read_text(encoding="utf-8")
    m = re.fullmatch(r'SDXLPIPE\.put\("([^"]+)",(.*)\);\n', text, re.S)
    assert m and m.group(1) == name, text[:200]
    return json.loads(m.group(2))
