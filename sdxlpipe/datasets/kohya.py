"""`sdxlpipe import kohya DATASET.toml`: a kohya dataset config as an sdxlpipe config.

kohya's [general] / [[datasets]] / [[datasets.subsets]] options are mapped
where sdxlpipe has the same setting; each option that cannot be mapped is
named, with why, in the written file and in the returned list. Caption and
bucket settings are global in sdxlpipe: when subsets disagree the first
value is used and the disagreement is named.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

from sdxlpipe.errors import UserError

# kohya option -> (sdxlpipe table, key). Subset-level ones may also sit in [general] or [[datasets]].
CAPTION_KEYS = {
    "shuffle_caption": "shuffle_tags", "keep_tokens": "keep_tokens",
    "caption_tag_dropout_rate": "tag_dropout", "caption_prefix": "caption_prefix",
    "caption_suffix": "caption_suffix", "caption_separator": "separator",
}
BUCKET_KEYS = {"min_bucket_reso": "min_side", "max_bucket_reso": "max_side", "bucket_reso_steps": "step",
               "bucket_no_upscale": "no_upscale"}
# Handled below by hand.
SOURCE_KEYS = {"image_dir", "num_repeats", "is_reg", "class_tokens", "caption_extension", "metadata_file"}
WHY_NOT = {
    "color_aug": "colour augmentation changes pixels every epoch, which cached latents cannot follow",
    "face_crop_aug_range": "face crops need a face detector and change the crop every epoch",
    "token_warmup_min": "token warm-up changes captions with the step, which cached text cannot follow",
    "token_warmup_step": "token warm-up changes captions with the step, which cached text cannot follow",
    "keep_tokens_separator": "not supported yet: use keep_tokens",
    "secondary_separator": "not supported yet",
    "enable_wildcard": "wildcards {a|b} are always on in sdxlpipe",
    "conditioning_data_dir": "ControlNet conditioning images are not supported",
    "cache_info": "sdxlpipe always caches its dataset scan (the stat memo)",
    "enable_bucket": "bucketing is always on",
    "validation_seed": "validation is a train setting",
    "validation_split": "validation is a train setting",
    "custom_attributes": "no equivalent",
}


def convert(kohya_toml: Path, out: Path, model: str) -> tuple[str, list[str]]:
    """(config text, unmapped-option notes) for a kohya dataset config."""
    try:
        doc = tomllib.loads(kohya_toml.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"{kohya_toml}: cannot read it as TOML ({e})", "pass kohya's dataset config (the --dataset_config file)")
    general = doc.get("general", {})
    datasets = doc.get("datasets", [])
    if not datasets:
        raise UserError(f"{kohya_toml}: no [[datasets]]", "a kohya dataset config has [[datasets]] with [[datasets.subsets]]")
    notes: list[str] = []
    caption: dict[str, Any] = {}
    bucket: dict[str, Any] = {}
    train: dict[str, Any] = {}
    encode: dict[str, Any] = {}
    sources: list[dict[str, Any]] = []
    resolution = None
    base = kohya_toml.parent

    def take(where: str, table: dict, key: str, value: Any, target: dict, name: str) -> None:
        if name in target and target[name] != value:
            notes.append(f"{where}.{key} = {value!r} differs from an earlier {target[name]!r}: "
                         f"sdxlpipe has one {name} for all sources, kept the first")
        else:
            target.setdefault(name, value)

    for d_i, dataset in enumerate(datasets):
        for s_i, subset in enumerate(dataset.get("subsets", [])):
            where = f"datasets[{d_i}].subsets[{s_i}]"
            merged = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}, **subset}
            for key, value in merged.items():
                if key in CAPTION_KEYS:
                    take(where, merged, key, value, caption, CAPTION_KEYS[key])
                elif key in BUCKET_KEYS:
                    take(where, merged, key, value, bucket, BUCKET_KEYS[key])
                elif key == "resolution":
                    res = value if isinstance(value, int) else int(round((value[0] * value[1]) ** 0.5))
                    if isinstance(value, list) and value[0] != value[1]:
                        notes.append(f"{where}.resolution = {value}: buckets keep the area of {res}^2")
                    if resolution is not None and resolution != res:
                        notes.append(f"{where}.resolution {res} differs from {resolution}: kept the first")
                    resolution = resolution or res
                elif key in ("batch_size", "caption_dropout_rate"):
                    take(where, merged, key, value, train, "caption_dropout" if key == "caption_dropout_rate" else key)
                elif key == "flip_aug":
                    take(where, merged, key, bool(value), encode, "flip_aug")
                elif key == "alpha_mask":
                    take(where, merged, key, "alpha" if value else "none", encode, "mask_from")
                elif key == "random_crop":
                    take(where, merged, key, "random" if value else "center", bucket, "crop")
                elif key in SOURCE_KEYS:
                    continue
                elif key in WHY_NOT:
                    if value not in (False, None, 0, "", [], {}) or key in ("enable_bucket",):
                        notes.append(f"{where}.{key}: not mapped ({WHY_NOT[key]})")
                else:
                    notes.append(f"{where}.{key}: not mapped (unknown to sdxlpipe's importer)")
            sources.append(_source(merged, base, out, where, notes))
    if resolution:
        bucket["resolution"] = resolution
    return _render(kohya_toml, model, sources, caption, bucket, encode, train, notes), _dedupe(notes)


def _source(merged: dict, base: Path, out: Path, where: str, notes: list[str]) -> dict[str, Any]:
    src: dict[str, Any] = {}
    if "metadata_file" in merged and "image_dir" not in merged:
        notes.append(f"{where}.metadata_file: kohya's fine-tuning json is not read; export it to jsonl "
                     "(image path + caption per line) and use it as a manifest source")
    image_dir = Path(merged.get("image_dir", "."))
    if not image_dir.is_absolute():
        image_dir = base / image_dir
    src["path"] = os.path.relpath(image_dir.absolute(), out.parent.absolute())
    src["repeats"] = int(merged.get("num_repeats", 1))
    if merged.get("is_reg"):
        src["is_reg"] = True
    if merged.get("class_tokens"):
        src["prompt"] = merged["class_tokens"]
        src["stem_captions"] = False  # kohya: no caption file -> the class tokens
    ext = merged.get("caption_extension", ".caption")
    if ext not in (".txt", ".caption"):
        notes.append(f"{where}.caption_extension = {ext!r}: sdxlpipe reads .txt, .caption, .yaml and .json sidecars")
    return src


def _dedupe(notes: list[str]) -> list[str]:
    return list(dict.fromkeys(notes))


def _render(kohya_toml: Path, model: str, sources, caption, bucket, encode, train, notes) -> str:
    q = json.dumps
    lines = [f"# Imported from kohya dataset config {kohya_toml} by `sdxlpipe import kohya`.",
             "# Run: sdxlpipe run all -c THIS_FILE", ""]
    if notes:
        lines.append("# kohya options that could not be mapped:")
        lines += [f"#   {n}" for n in _dedupe(notes)]
        lines.append("")
    lines += [f"model = {q(model)}", ""]

    def value(v: Any) -> str:
        return "true" if v is True else "false" if v is False else q(v)

    for s in sources:
        lines.append("[[sources]]")
        lines += [f"{k} = {value(v)}" for k, v in s.items()]
        lines.append("")
    for name, table in (("caption", caption), ("bucket", bucket), ("vae_encode", encode), ("train", train)):
        if table:
            lines.append(f"[{name}]")
            lines += [f"{k} = {value(v)}" for k, v in table.items()]
            lines.append("")
    return "\n".join(lines)
