"""Open and check a source image: the one place that knows image quirks.

`probe_image` reads a header and decodes the pixels once, so a truncated
file is caught at ingest, not hours into an encode; it returns the upright
size or a reason a person understands. `open_source_image` is what the
encode stage calls: any mode (CMYK, 16-bit, palette with transparency,
alpha, animated) becomes upright 8-bit RGB the same way every time.

A `source` is an absolute file path, or `tar:OFFSET:SIZE:/abs/shard.tar` for
an image stored inside a tar (webdataset shards are read in place).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# Bump when a change here alters the decoded RGB (alpha background, 16-bit scaling, mode
# conversions, orientation): it enters every vae_encode key, so cached latents are recomputed.
VERSION = 1
# Transparent pixels are laid on white: most alpha images in training sets are
# cut-outs and product shots shown on white.
ALPHA_BACKGROUND = (255, 255, 255)
TAR_PREFIX = "tar:"


@dataclass(frozen=True)
class ImageInfo:
    width: int  # after EXIF orientation
    height: int
    has_alpha: bool
    notes: tuple[str, ...] = ()  # conversions a person may want to know about


def tar_source(tar_path: str | Path, offset: int, size: int) -> str:
    return f"{TAR_PREFIX}{offset}:{size}:{Path(tar_path).absolute()}"


def read_source_bytes(source: str) -> bytes:
    """The image file's bytes, wherever they live."""
    if source.startswith(TAR_PREFIX):
        offset, size, path = source[len(TAR_PREFIX):].split(":", 2)
        with open(path, "rb") as f:
            f.seek(int(offset))
            data = f.read(int(size))
        if len(data) != int(size):
            raise OSError(f"{path} is shorter than when it was ingested; run ingest again")
        return data
    return Path(source).read_bytes()


def open_source_image(source: str, background: tuple[int, int, int] = ALPHA_BACKGROUND):
    """The image as training sees it: upright (EXIF), 8-bit RGB.

    An image with transparency comes back as RGBA whose colour is already laid
    on `background` and whose alpha is the original (for a masked loss):
    `.convert("RGB")` gives the training pixels either way.
    """
    from PIL import Image

    fp: BinaryIO | str = io.BytesIO(read_source_bytes(source)) if source.startswith(TAR_PREFIX) else source
    with Image.open(fp) as im:
        return to_rgb(im, background)


def open_source_alpha(source: str):
    """The upright alpha channel ("L", 255 = opaque) for a masked loss, or None if the image has none."""
    from PIL import Image, ImageOps

    fp: BinaryIO | str = io.BytesIO(read_source_bytes(source)) if source.startswith(TAR_PREFIX) else source
    with Image.open(fp) as im:
        im.seek(0)
        has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info)
        if not has_alpha:
            return None
        return ImageOps.exif_transpose(im).convert("RGBA").getchannel("A")


def to_rgb(im, background: tuple[int, int, int] = ALPHA_BACKGROUND):
    """Upright 8-bit RGB (RGBA if transparent, see above) from any PIL mode; animated: the first frame."""
    import numpy as np
    from PIL import Image, ImageOps

    im.seek(0)
    im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # convert("RGB") would clip 16-bit values at 255 (an all-white image): scale instead.
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        if mode == "F":
            top = max(float(arr.max()), 1.0)
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif mode in ("LA", "PA", "La"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "RGBa"):
        im = im.convert("RGBA")
        base = Image.new("RGBA", im.size, (*background, 255))
        out = Image.alpha_composite(base, im)
        # Colour already laid on the background; alpha kept for a masked loss.
        out.putalpha(im.getchannel("A"))
        return out
    return im.convert("RGB")


def probe_image(data: bytes | Path | str, max_pixels: int) -> ImageInfo | str:
    """The upright size and alpha of an image, or the reason it cannot be trained on."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, (str, Path)):
        if Path(data).stat().st_size == 0:
            return "empty file (0 bytes)"
        fp: BinaryIO | str = str(data)
    else:
        if not data:
            return "empty file (0 bytes)"
        fp = io.BytesIO(data)
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below decides; PIL's warning is only noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                w, h = im.size
                if w * h > max_pixels:
                    return (f"too large: {w}x{h} = {w * h} pixels is more than ingest.max_pixels={max_pixels} "
                            "(a guard against decompression bombs); raise max_pixels if the image is real")
                if w == 0 or h == 0:
                    return f"image has no pixels ({w}x{h})"
                frames = getattr(im, "n_frames", 1)
                if frames > 1:
                    notes.append(f"animated ({frames} frames): the first frame is used")
                mode = im.mode
                has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
                if mode == "CMYK":
                    notes.append("CMYK: converted to RGB")
                elif mode.startswith("I;16") or mode in ("I", "F"):
                    notes.append(f"{mode} (16/32-bit): scaled to 8-bit")
                if has_alpha:
                    notes.append("has transparency: laid on white")
                orientation = im.getexif().get(0x0112, 1)
                im.load()  # decodes every pixel: catches truncated files now, not mid-encode
    except Image.DecompressionBombError as e:
        return f"too large: {e} (a guard against decompression bombs); raise ingest.max_pixels if the image is real"
    except UnidentifiedImageError:
        return "not an image (no image format recognises its bytes; is the extension wrong?)"
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        text = str(e)
        if "truncated" in text or "broken data stream" in text or isinstance(e, EOFError):
            return f"truncated or damaged image data ({text}); re-download or re-export it"
        return f"damaged image ({text})"
    if orientation in (5, 6, 7, 8):
        w, h = h, w
        notes.append("EXIF orientation: rotated upright")
    return ImageInfo(w, h, has_alpha, tuple(notes))
