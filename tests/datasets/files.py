"""Real image files for dataset tests: every format and every quirk, made with PIL."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image


def noise(size=(64, 48), seed=0, mode="RGB") -> Image.Image:
    """Random pixels, so encoders cannot shrink the file to nothing and each seed differs."""
    rng = random.Random(seed)
    channels = len(mode)
    data = bytes(rng.randrange(256) for _ in range(size[0] * size[1] * channels))
    return Image.frombytes(mode, size, data)


def image_bytes(fmt: str, size=(64, 48), seed=0, **save) -> bytes:
    buf = io.BytesIO()
    im = noise(size, seed)
    if fmt == "PNG" and save.pop("rgba", False):
        im = noise(size, seed, "RGBA")
    im.save(buf, fmt, **save)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def good_and_quirky(folder: Path) -> dict[str, tuple[int, int]]:
    """Images that are odd but trainable, by file name -> the upright size ingest must report."""
    sizes = {}
    write(folder / "plain.jpg", image_bytes("JPEG", (64, 48), 1)); sizes["plain.jpg"] = (64, 48)
    write(folder / "plain.png", image_bytes("PNG", (48, 64), 2)); sizes["plain.png"] = (48, 64)
    write(folder / "plain.webp", image_bytes("WEBP", (80, 40), 3)); sizes["plain.webp"] = (80, 40)
    noise((40, 56), 4).convert("CMYK").save(folder / "cmyk.jpg"); sizes["cmyk.jpg"] = (40, 56)
    # 16-bit greyscale: a naive convert("RGB") clips it to white.
    # Left half 1000/65535 (near black), right half 60000/65535 (near white).
    Image.fromarray(np.repeat(np.array([[1000] * 16 + [60000] * 16], np.uint16), 32, 0)).save(folder / "sixteen.png")
    sizes["sixteen.png"] = (32, 32)
    pal = noise((36, 36), 5).convert("P")
    pal.save(folder / "palette.png", transparency=0); sizes["palette.png"] = (36, 36)
    write(folder / "alpha.png", image_bytes("PNG", (44, 44), 6, rgba=True)); sizes["alpha.png"] = (44, 44)
    frames = [noise((30, 20), s) for s in (7, 8, 9)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:]); sizes["animated.gif"] = (30, 20)
    im = noise((80, 40), 10)
    exif = im.getexif()
    exif[0x0112] = 6  # stored 80x40, shown rotated: 40x80
    im.save(folder / "rotated.jpg", exif=exif); sizes["rotated.jpg"] = (40, 80)
    return sizes


def bad_files(folder: Path) -> dict[str, str]:
    """Files that cannot be trained on, by name -> a word their reject reason must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(image_bytes("JPEG", (256, 256), 11)[:1500])
    (folder / "truncated.png").write_bytes(image_bytes("PNG", (128, 128), 12)[:3000])
    (folder / "notes.jpg").write_bytes(b"shopping list: eggs, milk\n")
    # A real image larger than the test config's max_pixels (the bomb guard).
    Image.new("RGB", (400, 400), (9, 9, 9)).save(folder / "huge.png")
    return {"empty.png": "empty", "truncated.jpg": "truncated", "truncated.png": "truncated",
            "notes.jpg": "not an image", "huge.png": "too large"}
