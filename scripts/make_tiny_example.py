"""Write examples/tiny/images: small images of coloured shapes with captions.

    python scripts/make_tiny_example.py examples/tiny/images

Deterministic (seeded), mixed sizes and aspect ratios, JPEG and PNG, one
`.txt` caption per image except two that fall back to their file name.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 80, 220),
           "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
# Portrait, landscape and square, so several buckets are used.
SIZES = ((128, 128), (96, 160), (160, 96), (200, 120), (120, 200), (144, 144), (180, 100), (100, 180))


def draw(shape: str, fg, bg, size, rng: random.Random) -> Image.Image:
    w, h = size
    im = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(im)
    r = int(min(w, h) * rng.uniform(0.25, 0.4))
    cx, cy = int(w * rng.uniform(0.35, 0.65)), int(h * rng.uniform(0.35, 0.65))
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fg)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    return im


def main(out: Path, count: int = 32, seed: int = 0) -> None:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        fg_name, bg_name = rng.sample(names, 2)
        size = SIZES[i % len(SIZES)]
        im = draw(shape, COLOURS[fg_name], COLOURS[bg_name], size, rng)
        stem = f"{i:03d}_{fg_name}_{shape}"
        if i % 3 == 0:
            im.save(out / f"{stem}.png")
        else:
            im.save(out / f"{stem}.jpg", quality=90)
        if i not in (5, 17):  # these two are captioned from their file name
            (out / f"{stem}.txt").write_text(f"a {fg_name} {shape} on a {bg_name} background\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/tiny/images"))
