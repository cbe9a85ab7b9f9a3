"""`sdxlpipe init PATH`: look at a dataset and a model, write a config that runs on them.

It recognises the layouts people have: img2dataset output (`NNNNN.tar` +
`NNNNN.parquet` + `NNNNN_stats.json`), a kohya tree (`<repeats>_<name>/`
folders, or `img/` and `reg/` holding them), an EveryDream tree
(`multiply.txt`, `.yaml` captions), a manifest (a .jsonl/.csv/.parquet file,
or a Hugging Face imagefolder's `metadata.jsonl`), or a plain folder. It
counts only images whose header opens and lists the others, reads which
caption files exist and whether captions look like booru tags, and takes the
resolution, bucket step and training defaults from the model (the tiny model:
its 128 px and a run of minutes on a CPU; SDXL: 1024 / 64 and kohya-like LoRA
settings). The config's comments say what it saw and why it chose each value.
"""

from __future__ import annotations

import json
import os
import statistics
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from sdxlpipe.datasets.base import IMAGE_EXTENSIONS
from sdxlpipe.datasets.folder import KOHYA_FOLDER, list_images
from sdxlpipe.datasets.manifest import MANIFEST_EXTENSIONS
from sdxlpipe.datasets.sidecars import SIDECAR_EXTENSIONS, find_sidecar
from sdxlpipe.errors import UserError

# Captions read to tell booru tags from sentences; enough for a median.
CAPTION_SAMPLE = 500
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
# Hugging Face imagefolder's manifest names, and the columns people use for the image path and caption.
IMAGEFOLDER_MANIFESTS = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
IMAGE_COLUMNS = ("image", "file_name", "file", "path", "filepath", "image_path")
CAPTION_COLUMNS = ("text", "caption", "prompt", "tags")
# Folder names that hold kohya regularisation (class) images.
REG_NAMES = ("reg", "regs", "regularization", "regularisation", "class")


@dataclass
class Source:
    """One [[sources]] entry init will write, and what it saw there."""

    path: Path
    kind: str  # folder, webdataset, manifest
    images: list[Path] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    samples: int = 0  # images that count (webdataset: samples in the tars)
    tars: int = 0
    kohya: dict[str, int] = field(default_factory=dict)  # folder -> repeats
    is_reg: bool = False
    image_column: str = ""
    caption_column: str = ""
    notes: list[str] = field(default_factory=list)


def model_defaults(model: str, base: Path) -> dict:
    """Bucket and training settings that suit the model: read from it, without loading it."""
    native = 1024
    if model == "tiny":
        from sdxlpipe.models.tiny_config import tiny_configs

        native = tiny_configs()["unet"]["sample_size"] * 8
    else:
        config = (base / model / "unet" / "config.json") if not Path(model).is_absolute() else Path(model) / "unet" / "config.json"
        if config.is_file():
            native = int(json.loads(config.read_text()).get("sample_size", 128)) * 8
    if model == "tiny" or native < 512:
        return {
            "why": f"the tiny model is trained at {native} px; these settings finish in a few minutes on a CPU",
            "resolution": native, "step": 32, "min_side": native // 2, "max_side": native * 2,
            "rank": 4, "alpha": 8.0, "learning_rate": 1e-3, "batch_size": 4, "max_steps": 100,
            "save_every_steps": 50, "extra": [],
        }
    return {
        "why": f"SDXL is trained at {native} px in buckets of 64; LoRA settings like kohya's common SDXL presets",
        "resolution": native, "step": 64, "min_side": 512, "max_side": 2048,
        "rank": 32, "alpha": 16.0, "learning_rate": 1e-4, "batch_size": 4, "max_steps": 1600,
        "save_every_steps": 400,
        "extra": ['lr_scheduler = "cosine"', "lr_warmup = 0.05       # 5% of the steps",
                  'mixed_precision = "bf16"  # "fp16" on GPUs without bf16; "no" on a CPU',
                  "gradient_checkpointing = true  # fits a 24 GB GPU"],
    }


def survey(path: Path) -> list[Source]:
    """The sources to write for `path`, each with its counts; a UserError when nothing trainable is there."""
    if path.is_file():
        if path.suffix.lower() not in MANIFEST_EXTENSIONS:
            raise UserError(f"{path} is neither a folder nor a manifest",
                            "pass a folder of images or tars, or a .jsonl/.csv/.parquet manifest")
        return [_manifest(path)]
    from sdxlpipe.datasets.webdataset import looks_like_webdataset

    if looks_like_webdataset(path):
        return [_webdataset(path)]
    for name in IMAGEFOLDER_MANIFESTS:
        if (path / name).is_file():
            found = _manifest(path / name)
            found.notes.append(f"a Hugging Face imagefolder: {name} gives the captions")
            return [found]
    subdirs = _subdirs(path)
    if subdirs and all(KOHYA_FOLDER.match(d.name) for d in subdirs):
        return [_folder(path, kohya=True)]
    # img/ + reg/: each holding kohya folders (kohya's GUI writes this layout).
    if subdirs and all(_subdirs(d) and all(KOHYA_FOLDER.match(x.name) for x in _subdirs(d)) for d in subdirs):
        return [_folder(d, kohya=True, is_reg=d.name.lower() in REG_NAMES) for d in subdirs]
    return [_folder(path, kohya=False)]


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _header_opens(image: Path) -> str | None:
    """None when PIL reads the header; else why not (ingest later checks every pixel)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if image.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(image) as im:
            w, h = im.size
        return None if w and h else f"image has no pixels ({w}x{h})"
    except UnidentifiedImageError:
        return "not an image (no image format recognises its bytes)"
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return f"damaged image ({e})"


def _count(source: Source, images: list[Path]) -> None:
    for image in images:
        reason = _header_opens(image)
        if reason:
            source.rejected.append((str(image), reason))
        else:
            source.images.append(image)
    source.samples = len(source.images)


def _folder(path: Path, kohya: bool, is_reg: bool = False) -> Source:
    source = Source(path, "folder", is_reg=is_reg)
    _count(source, list_images(path))
    if kohya:
        source.kohya = {d.name: int(KOHYA_FOLDER.match(d.name).group(1)) for d in _subdirs(path)}
    multiply = sorted(path.rglob("multiply.txt"))
    yaml_captions = sum(1 for i in source.images if i.with_suffix(".yaml").is_file() or i.with_suffix(".yml").is_file())
    if multiply or yaml_captions:
        source.notes.append(f"an EveryDream tree: {len(multiply)} multiply.txt, {yaml_captions} .yaml caption(s); "
                            "both are read as they are")
    return source


def _webdataset(path: Path) -> Source:
    from sdxlpipe.datasets.webdataset import list_tars

    tars = list_tars(path)
    source = Source(path, "webdataset", tars=len(tars))
    for tar in tars:
        try:
            with tarfile.open(tar, "r:") as tf:
                keys = {m.name.rpartition(".")[0] for m in tf if m.isfile()
                        and Path(m.name).suffix.lower() in IMAGE_EXTENSIONS}
        except tarfile.ReadError as e:
            source.rejected.append((str(tar), f"not an uncompressed tar ({e})"))
            continue
        source.samples += len(keys)
    stats = sorted(path.glob("*_stats.json"))
    if stats and any(path.glob("*.parquet")):
        source.notes.append(f"img2dataset output ({len(stats)} _stats.json); tars read in place, "
                            "captions from each sample's .txt/.json")
    return source


def _manifest(path: Path) -> Source:
    from sdxlpipe.datasets.manifest import read_rows

    rows = read_rows(path)
    columns = list(rows[0]) if rows else []
    image_column = next((c for c in IMAGE_COLUMNS if c in columns), "")
    if not image_column:
        raise UserError(f"{path}: no image path column (columns: {', '.join(map(str, columns)) or 'none'})",
                        f"name the column with the image paths one of: {', '.join(IMAGE_COLUMNS)}")
    source = Source(path, "manifest", image_column=image_column,
                    caption_column=next((c for c in CAPTION_COLUMNS if c in columns), "text"))
    images = []
    for n, row in enumerate(rows):
        value = row.get(image_column)
        image = Path(str(value)) if value and Path(str(value)).is_absolute() else path.parent / str(value or "")
        if not value or not image.is_file():
            source.rejected.append((f"{path} row {n}", f"{value!r} does not exist"))
        else:
            images.append(image)
    _count(source, images)
    return source


def _captions(sources: list[Source]) -> dict:
    kinds: dict[str, int] = {}
    texts = []
    for s in sources:
        for image in s.images:
            ext = next((e for e in SIDECAR_EXTENSIONS if image.with_suffix(e).is_file()), None)
            if ext:
                kinds[ext] = kinds.get(ext, 0) + 1
                if len(texts) < CAPTION_SAMPLE:
                    text = find_sidecar(image)
                    if text:
                        texts.append(text)
    tags = [len([t for t in c.split(",") if t.strip()]) for c in texts]
    return {"kinds": kinds, "with_caption": sum(kinds.values()),
            "booru": bool(tags) and statistics.median(tags) >= 5, "median_tags": statistics.median(tags) if tags else 0}


def _median_pixels(sources: list[Source]) -> int:
    from PIL import Image

    images = [i for s in sources for i in s.images]
    sizes = []
    for image in images[::max(1, len(images) // CAPTION_SAMPLE)][:CAPTION_SAMPLE]:
        with Image.open(image) as im:
            sizes.append(im.size[0] * im.size[1])
    return int(statistics.median(sizes)) if sizes else 0


def write_config(path: Path, out: Path, model: str = SDXL_BASE) -> tuple[Path, list[Source]]:
    sources = survey(path)
    if not any(s.samples for s in sources):
        rejected = sum(len(s.rejected) for s in sources)
        raise UserError(f"no images found in {path}" + (f" ({rejected} file(s) do not open as images)" if rejected else ""),
                        "pass the folder that holds your images, img2dataset's tar shards, or a manifest file")
    d = model_defaults(model, out.parent.absolute())
    captions = _captions(sources)
    q = json.dumps
    lines = [f"# sdxlpipe run all -c {out.name}", "#", f"# Written by `sdxlpipe init {path}`. What it saw:"]
    for s in sources:
        if s.kind == "webdataset":
            lines.append(f"#   {s.path.name}: {s.tars} tar shard(s) holding {s.samples} samples")
        else:
            lines.append(f"#   {s.path.name}: {s.samples} images" + (f" listed in the manifest ({s.image_column!r} column)"
                                                                     if s.kind == "manifest" else ""))
        if s.rejected:
            lines.append(f"#   {len(s.rejected)} file(s) that do not open as images are left out (ingest names them)")
        lines += [f"#   {note}" for note in s.notes]
        if s.kohya:
            lines.append("#   kohya folders: " + ", ".join(f"{n} (x{r})" for n, r in s.kohya.items()))
    if captions["kinds"]:
        lines.append("#   caption files: " + ", ".join(f"{n} {ext}" for ext, n in sorted(captions["kinds"].items())))
    lines += ["", "# The base model: a Hub id (from the local cache), a diffusers folder, a .safetensors file, or \"tiny\".",
              f"model = {q(model)}"]
    if d["step"] == 64:
        lines.append('device = "cuda"          # "cpu" works, slowly')
    for s in sources:
        rel = os.path.relpath(s.path.absolute(), out.parent.absolute())
        lines += ["", "[[sources]]", f"path = {q(rel)}"]
        if s.kind == "manifest":
            lines += [f"image_column = {q(s.image_column)}", f"caption_column = {q(s.caption_column)}"]
        if s.kohya:
            lines.append("kohya_folders = true   # repeats and the class tokens (for uncaptioned images) come from the folder names")
        if s.is_reg:
            lines.append("is_reg = true          # regularisation (class) images")
        if s.kind == "folder" and not s.kohya:
            missing = s.samples - sum(1 for i in s.images if any(i.with_suffix(e).is_file() for e in SIDECAR_EXTENSIONS))
            if missing:
                lines.append(f"# {missing} image(s) have no caption file: they are captioned with their file name.")
                lines.append('# To use a fixed instance prompt instead: prompt = "a photo of sks dog" and stem_captions = false')
        if not s.kohya:
            lines.append("repeats = 1            # raise for small datasets (kohya's num_repeats)")
    lines += ["", "[caption]"]
    if captions["booru"]:
        lines += [f"# Captions look like booru tags (median {captions['median_tags']} comma-separated tags): shuffle them",
                  "# so no tag position is learnt, keeping the first one (often a trigger or character name).",
                  "shuffle_tags = true", "keep_tokens = 1", "variants = 8           # shuffled versions cached per image"]
    else:
        lines.append('caption_prefix = ""     # e.g. a trigger word: "sks, "')
    lines += ["", f"# {d['why']}.", "[bucket]",
              f"resolution = {d['resolution']}" + ("       # or preset = \"sdxl\": SDXL's exact 40 buckets" if d["step"] == 64 else ""),
              f"step = {d['step']}", f"min_side = {d['min_side']}", f"max_side = {d['max_side']}"]
    median = _median_pixels(sources)
    if median and median < 0.5 * d["resolution"] ** 2:
        lines.append(f"# Most images are small (median {median} pixels < half of {d['resolution']}^2): they are")
        lines.append("# upscaled to fill a bucket. no_upscale = true trains them at their own size instead.")
    lines.append("no_upscale = false")
    lines += ["", "[train]", f"rank = {d['rank']}", f"alpha = {d['alpha']}",
              f"learning_rate = {d['learning_rate']:.0e}".replace("e-0", "e-"),
              f"batch_size = {d['batch_size']}          # lower it if you run out of memory",
              f"max_steps = {d['max_steps']}", f"save_every_steps = {d['save_every_steps']}", *d["extra"],
              "", "[export]", 'formats = ["kohya", "diffusers"]', 'output_dir = "output"',
              f"name = {q(path.absolute().stem or 'lora')}", ""]
    from sdxlpipe.cache_format.shards import default_mode, write_atomic

    write_atomic(out, "\n".join(lines).encode("utf-8"), mode=default_mode())  # --force must not leave half a config
    return out, sources
