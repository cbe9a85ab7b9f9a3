"""`sdxlpipe init FOLDER`: look at a dataset folder and write a config that runs on it.

It reads the layout (kohya `<repeats>_<name>/` folders, webdataset tars,
plain folders), which caption files exist, whether captions look like
booru tags, and the image sizes (headers only), then writes a commented
`sdxlpipe.toml` whose comments say what it saw and why it chose each value.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from sdxlpipe.datasets.folder import KOHYA_FOLDER, list_images
from sdxlpipe.datasets.sidecars import SIDECAR_EXTENSIONS, find_sidecar

# Headers read to estimate sizes; enough for a median, cheap on a million files.
SIZE_SAMPLE = 500
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"


def survey(folder: Path) -> dict:
    from PIL import Image

    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    tars = [p for p in entries if p.suffix.lower() == ".tar"]
    subdirs = [p for p in entries if p.is_dir()]
    kohya = bool(subdirs) and all(KOHYA_FOLDER.match(p.name) for p in subdirs)
    images = [] if tars else list_images(folder)
    sidecar_kinds: dict[str, int] = {}
    captions = []
    for img in images:
        for ext in SIDECAR_EXTENSIONS:
            if img.with_suffix(ext).is_file():
                sidecar_kinds[ext] = sidecar_kinds.get(ext, 0) + 1
                break
    for img in images[:SIZE_SAMPLE]:
        text = find_sidecar(img)
        if text:
            captions.append(text)
    sizes = []
    step = max(1, len(images) // SIZE_SAMPLE)
    for img in images[::step][:SIZE_SAMPLE]:
        try:
            with Image.open(img) as im:
                sizes.append(im.size)
        except Exception:  # noqa: BLE001 - init only estimates; ingest names bad files
            pass
    tags_per_caption = [len([t for t in c.split(",") if t.strip()]) for c in captions]
    return {
        "images": len(images), "tars": len(tars), "kohya_folders": kohya,
        "kohya_repeats": {p.name: int(KOHYA_FOLDER.match(p.name).group(1)) for p in subdirs} if kohya else {},
        "sidecars": sidecar_kinds, "with_caption": sum(sidecar_kinds.values()),
        "booru_tags": bool(tags_per_caption) and statistics.median(tags_per_caption) >= 5,
        "median_tags": statistics.median(tags_per_caption) if tags_per_caption else 0,
        "median_pixels": statistics.median(w * h for w, h in sizes) if sizes else 0,
        "median_size": sorted(sizes, key=lambda s: s[0] * s[1])[len(sizes) // 2] if sizes else None,
    }


def write_config(folder: Path, out: Path, model: str = SDXL_BASE) -> tuple[Path, dict]:
    s = survey(folder)
    rel = os.path.relpath(folder.absolute(), out.parent.absolute())
    q = json.dumps
    lines = [
        f"# sdxlpipe run all -c {out.name}",
        "#",
        f"# Written by `sdxlpipe init {folder}`. What it saw:",
    ]
    if s["tars"]:
        lines.append(f"#   {s['tars']} webdataset tar shard(s) (read in place; captions from each sample's .txt/.json)")
    else:
        side = ", ".join(f"{n} {ext}" for ext, n in sorted(s["sidecars"].items())) or "none"
        lines.append(f"#   {s['images']} images; caption files: {side}")
        if s["median_size"]:
            w, h = s["median_size"]
            lines.append(f"#   median image size {w}x{h}")
    if s["kohya_folders"]:
        lines.append("#   kohya folders: " + ", ".join(f"{n} (x{r})" for n, r in s["kohya_repeats"].items()))
    lines += ["", "# The base model: a Hub id (from the local cache), a diffusers folder, a .safetensors file, or \"tiny\".",
              f"model = {q(model)}", "", "[[sources]]", f"path = {q(rel)}"]
    if s["kohya_folders"]:
        lines.append("kohya_folders = true   # repeats and the class tokens (for uncaptioned images) come from the folder names")
    elif not s["tars"]:
        missing = s["images"] - s["with_caption"]
        if missing:
            lines.append(f"# {missing} image(s) have no caption file: they are captioned with their file name.")
            lines.append('# To use a fixed instance prompt instead: prompt = "a photo of sks dog" and stem_captions = false')
    lines += ["repeats = 1            # raise for small datasets (kohya's num_repeats)", "", "[caption]"]
    if s["booru_tags"]:
        lines += [f"# Captions look like booru tags (median {s['median_tags']} comma-separated tags): shuffle them",
                  "# so no tag position is learnt, keeping the first one (often a trigger or character name).",
                  "shuffle_tags = true", "keep_tokens = 1", "variants = 8           # shuffled versions cached per image"]
    else:
        lines.append('caption_prefix = ""     # e.g. a trigger word: "sks, "')
    lines += ["", "[bucket]", "resolution = 1024       # SDXL's training resolution (or preset = \"sdxl\": its exact 40 buckets)",
              "step = 64"]
    if s["median_pixels"] and s["median_pixels"] < 0.5 * 1024 * 1024:
        lines.append(f"# Most images are small (median {int(s['median_pixels'])} pixels < half of 1024^2): they are")
        lines.append("# upscaled to fill a bucket. no_upscale = true trains them at their own size instead.")
    lines.append("no_upscale = false")
    lines += ["", "[train]", "batch_size = 4          # lower it if you run out of GPU memory",
              "max_steps = 1000", "", "[export]", 'formats = ["kohya", "diffusers"]', 'output_dir = "output"',
              f"name = {q(folder.absolute().name or 'lora')}", ""]
    out.write_text("\n".join(lines), encoding="utf-8")
    return out, s
