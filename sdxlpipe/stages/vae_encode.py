"""VAE encode: each image's latent distribution, cached in the store.

Recipe: one key per row from the image bytes, its resize and crop, the flip,
the mask source and the VAE's weights -> the keys the store lacks (in this
`--shards` partition) -> chunks, one shard each, grouped by bucket -> decode,
resize, crop in worker processes -> encode in batches -> store mean and std
in fp16 (and the mask at latent resolution) -> `latent_key` and
`latent_flip_key` columns. Non-finite latents (SDXL's VAE in fp16) are
encoded again in fp32; a NaN is never stored.

Chunks are a pure function of the table (bucket, and the key's hash among
the bucket's chunks), not of what happens to be missing, and the encode is
deterministic: two processes that encode the same chunk write the same
shard, byte for byte, so concurrent runs on one store hold each item once.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

from sdxlpipe.datasets import open_image
from sdxlpipe.engines import images
from sdxlpipe.pipeline.keys import item_keys, partition_of
from sdxlpipe.pipeline.plan import plan_items, walk_chunks, write_results

VERSION = 1
# The table columns holding keys of this stage's store items: the runner checks them for damage.
STORE_COLUMNS = ("latent_key", "latent_flip_key")
# The model parts this stage's items depend on: `status` names them when their weights change.
MODELS = ("vae",)
OUTPUT_COLUMNS = ("latent_key", "latent_flip_key")
FIELD = "latent.safetensors"
# Its items are latents (flipped ones too), not images.
ITEMS = "latents"
# SDXL's VAE downsamples x8 (so does tiny's); the mask is stored at this resolution.
LATENT_FACTOR = 8


@dataclass(frozen=True)
class Params:
    # Images per VAE call; 8 fits a 24 GB GPU at 1024^2 in fp16 with room to spare.
    batch_size: int = 8
    # fp32 is exact; fp16/bf16 halve the VAE's memory (NaNs are re-encoded in fp32).
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # Also cache each image's horizontally flipped latent (kohya's flip_aug); training
    # then picks one of the two at random. Doubles the encode time and the store.
    flip_aug: bool = False
    # Masked loss: "none"; "alpha" (the image's alpha channel: transparent = ignored);
    # or a folder of mask images named like the images (white = counts).
    mask_from: str = "none"
    # Decode/resize worker processes; 0 decodes in the encoder's process. Raise it
    # until bench/encode.py shows the encoder is never idle.
    workers: int = 2
    # Images per shard (0 = fill ~256 MiB shards); lower it to lose less to one corrupt shard.
    images_per_shard: int = 0


def check(p: Params) -> list[tuple[str, str]]:
    problems = []
    if p.batch_size < 1:
        problems.append(("vae_encode.batch_size", "must be >= 1"))
    if p.workers < 0:
        problems.append(("vae_encode.workers", "must be >= 0"))
    if p.images_per_shard < 0:
        problems.append(("vae_encode.images_per_shard", "must be >= 0 (0 = fill 256 MiB shards)"))
    if p.mask_from not in ("none", "alpha"):
        from pathlib import Path

        if not Path(p.mask_from).is_dir():
            problems.append(("vae_encode.mask_from", f'must be "none", "alpha" or a folder of masks; '
                                                     f"{p.mask_from!r} is not a folder"))
    return problems


def key_doc(row: dict, params: Params, vae_fingerprint: str, flip: bool = False, mask: str | None = None) -> dict:
    doc = {
        "stage": "vae_encode", "version": VERSION, "content_hash": row["content_hash"],
        # The code that shapes the pixels before the VAE sees them, not only this module's.
        "pixels": [open_image.VERSION, images.VERSION],
        "resize": [row["resize_w"], row["resize_h"]], "crop": [row["crop_top"], row["crop_left"]],
        "size": [row["bucket_w"], row["bucket_h"]], "dtype": params.dtype, "vae": vae_fingerprint,
    }
    # Added only when set, so turning them on leaves every plain latent's key as it was.
    if flip:
        doc["flip"] = True
    if mask is not None:
        doc["mask"] = mask
    return doc


def _mask_sources(table: pa.Table, params: Params, ctx) -> tuple[list[str | None], list[str]]:
    """Per row: what enters the key for its mask (None = no mask), and the mask file ("" if none)."""
    from sdxlpipe.engines.images import find_mask

    if params.mask_from == "none":
        return [None] * table.num_rows, ["none"] * table.num_rows
    if params.mask_from == "alpha":
        return ["alpha"] * table.num_rows, ["alpha"] * table.num_rows
    files = [find_mask(params.mask_from, source) for source in table.column("source").to_pylist()]
    lacking = sum(1 for f in files if not f)
    if lacking and not ctx.dry_run:
        ctx.log.warning("%d image(s) have no mask in %s: the whole image counts for them", lacking, params.mask_from)
    return ["file:" + ctx.memo.hash_file(f) if f else "full" for f in files], files


def keys_of(table: pa.Table, params: Params, vae_fingerprint: str, flip: bool = False,
            masks: list[str | None] | None = None) -> list[str]:
    """`item_key(key_doc(row, ...))` of every row, bit for bit, from the table's columns
    (pipeline/keys.item_keys: ~3 us a row, where a dict and a json.dumps per row took ~15)."""
    fixed = key_doc({"content_hash": "", "resize_w": 0, "resize_h": 0, "crop_top": 0, "crop_left": 0,
                     "bucket_w": 0, "bucket_h": 0}, params, vae_fingerprint, flip)
    c = table.column
    columns = {"content_hash": c("content_hash"), "resize": (c("resize_w"), c("resize_h")),
               "crop": (c("crop_top"), c("crop_left")), "size": (c("bucket_w"), c("bucket_h"))}
    if masks is not None and any(m is not None for m in masks):
        columns["mask"] = masks  # all set or all None (_mask_sources)
    return item_keys({k: v for k, v in fixed.items() if k not in columns}, columns)


def run(table: pa.Table, params: Params, ctx) -> pa.Table:
    vae_fp = ctx.models.fingerprints()["vae"]
    mask_docs, mask_files = _mask_sources(table, params, ctx)
    keys = keys_of(table, params, vae_fp, masks=mask_docs)
    flip_keys = keys_of(table, params, vae_fp, True, mask_docs) if params.flip_aug else [None] * len(keys)
    wanted = keys + [k for k in flip_keys if k is not None]
    todo = set(plan_items(ctx, wanted))
    if todo and not ctx.dry_run:
        rows = table.to_pylist()  # only when there is work: ~2 us a row
        jobs = _jobs(rows, keys, flip_keys, mask_files, todo, params)
        failed = _encode(_chunks(jobs, rows, keys, params, ctx.store), params, ctx)
        stats = ctx.stats[ctx.stage]
        stats.failed = len(failed)
        stats.computed -= len(failed)
        if failed:
            keep = [i for i, k in enumerate(keys) if k not in failed]
            table, keys = table.take(keep), [keys[i] for i in keep]
            flip_keys = [flip_keys[i] for i in keep]
    table = table.append_column("latent_key", pa.array(keys, pa.string()))
    return table.append_column("latent_flip_key", pa.array(flip_keys, pa.string()))


def _jobs(rows, keys, flip_keys, mask_files, todo: set[str], params: Params) -> list[dict]:
    """One job per distinct image that has a latent to compute: decode once, encode one or two."""
    jobs, seen = [], set()
    for row, key, flip_key, mask in zip(rows, keys, flip_keys, mask_files):
        if key in seen:
            continue
        seen.add(key)
        plain, flipped = key in todo, flip_key is not None and flip_key in todo
        if not (plain or flipped):
            continue
        jobs.append({
            "key": key if plain else "", "flip_key": flip_key if flipped else "",
            "chunk_key": key, "source": row["source"],
            **{c: int(row[c]) for c in ("resize_w", "resize_h", "crop_top", "crop_left", "bucket_w", "bucket_h")},
            "mask": mask, "latent_factor": LATENT_FACTOR,
        })
    return jobs


def _chunks(jobs: list[dict], rows, keys, params: Params, store) -> list[list[dict]]:
    """Jobs grouped into shard-sized chunks that depend on the table only, never on timing."""
    per_bucket: dict[tuple[int, int], int] = {}
    for row, key in zip(rows, dict.fromkeys(keys)):
        b = (row["bucket_w"], row["bucket_h"])
        per_bucket[b] = per_bucket.get(b, 0) + 1
    chunks: dict[tuple[int, int, int], list[dict]] = {}
    for job in jobs:
        b = (job["bucket_w"], job["bucket_h"])
        if params.images_per_shard:
            per_shard = params.images_per_shard
        else:
            # An item: mean and std in fp16, the mask, ~0.5 KB of safetensors header (names,
            # shapes, metadata); a job is two items with the flip. The store's shard size decides.
            latent = 4 * (b[0] // LATENT_FACTOR) * (b[1] // LATENT_FACTOR) * 2
            per_shard = max(1, store.chunk_size(2 * latent + latent // 4 + 512) // (2 if params.flip_aug else 1))
        n = max(1, math.ceil(per_bucket[b] / per_shard))
        chunks.setdefault((*b, partition_of(job["chunk_key"], n)), []).append(job)
    return [sorted(chunks[c], key=lambda j: j["chunk_key"]) for c in sorted(chunks)]


def _encode(chunks: list[list[dict]], params: Params, ctx) -> set[str]:
    """Encode and store the chunks, one shard each; return the keys that failed."""
    from sdxlpipe.engines import run_engine
    from sdxlpipe.engines.images import load_job

    engine = run_engine(ctx, params.workers)
    failed: set[str] = set()
    total = sum(bool(j["key"]) + bool(j["flip_key"]) for c in chunks for j in c)
    group = "vae:" + ctx.models.fingerprints()["vae"]  # `store du` counts bytes per VAE
    make_worker = functools.partial(VaeWorker, ctx.models.loader("vae", portable=engine.name != "local"),
                                    params.dtype)
    with ctx.reporter.track("vae_encode", total) as advance:
        if engine.name == "local":
            # The model is loaded before the first look at the index, so that look is fresh
            # when the chunk is encoded. Then chunk by chunk, in this writer's own order,
            # without what other writers committed meanwhile (decision 7).
            worker = make_worker()
            for chunk, missing in walk_chunks(ctx, "vae_encode", chunks, _job_keys, advance):
                chunk = _without_committed(chunk, missing)
                write_results(engine.run(chunk, load_job, lambda: worker, params.batch_size),
                              "vae_encode", FIELD, ctx, failed, advance, group)
        else:
            jobs = [{**j, "chunk": i} for i, c in enumerate(chunks) for j in c]
            write_results(engine.run(jobs, load_job, make_worker, params.batch_size),
                          "vae_encode", FIELD, ctx, failed, advance, group)
    return failed


def _job_keys(job: dict) -> list[str]:
    return [k for k in (job["key"], job["flip_key"]) if k]


def _without_committed(chunk: list[dict], missing: set[str]) -> list[dict]:
    """The chunk without the latents another writer committed since we planned."""
    out = []
    for j in chunk:
        j = {**j, "key": j["key"] if j["key"] in missing else "",
             "flip_key": j["flip_key"] if j["flip_key"] in missing else ""}
        if j["key"] or j["flip_key"]:
            out.append(j)
    return out


class VaeWorker:
    """The model side: batches of decoded images in, safetensors payloads out.

    `load_vae(dtype)` gives the VAE; the fp32 one is loaded only if a latent
    comes out non-finite. One instance lives as long as its engine.
    """

    def __init__(self, load_vae, dtype: str):
        self.load_vae = load_vae
        self.dtype = dtype
        self.vae = load_vae(dtype)

    def __call__(self, jobs: list[dict], prepared: list) -> list:
        import torch

        results: list = []
        groups: dict[tuple[int, int], list] = {}
        for job, item in zip(jobs, prepared):
            if "error" in item:
                results += [(k, None, item["error"], job.get("chunk"), job["source"])
                            for k in (job["key"], job["flip_key"]) if k]
            else:
                groups.setdefault((job["bucket_w"], job["bucket_h"]), []).append((job, item))
        for group in groups.values():
            wanted = [(j, i, False) for j, i in group if j["key"]] + [(j, i, True) for j, i in group if j["flip_key"]]
            images = [torch.from_numpy(i["pixels"]).permute(2, 0, 1) for _, i, _ in wanted]
            batch = torch.stack([im.flip(-1) if flipped else im for im, (_, _, flipped) in zip(images, wanted)])
            mean, std, redone = self._encode(batch.float() / 127.5 - 1.0)
            for n, (job, item, flipped) in enumerate(wanted):
                tensors = {"mean": mean[n].to(torch.float16).contiguous(), "std": std[n].to(torch.float16).contiguous()}
                if item["mask"] is not None:
                    mask = torch.from_numpy(item["mask"])
                    tensors["mask"] = (mask.flip(-1) if flipped else mask).to(torch.float16).contiguous()
                note = (f"{job['source']}{' (flipped)' if flipped else ''}: latent not finite in {self.dtype}, "
                        "encoded again in float32") if redone[n] else ""
                key = job["flip_key"] if flipped else job["key"]
                results.append((key, self._payload(tensors), note, job.get("chunk"), job["source"]))
        # Job order within a chunk, so that a shard's bytes depend on its items only.
        order = {j["source"]: n for n, j in enumerate(jobs)}
        return sorted(results, key=lambda r: (order[r[4]], r[0]))

    def _payload(self, tensors: dict) -> bytes:
        from sdxlpipe.cache_format import encode_tensors

        cfg = self.vae.config
        return encode_tensors(tensors, {"scaling_factor": str(cfg.scaling_factor),
                                        "shift_factor": str(getattr(cfg, "shift_factor", None) or 0.0)})

    def _encode(self, pixels):
        import torch

        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
            mean, std = dist.mean.float(), dist.std.float()
            bad = ~(torch.isfinite(mean).flatten(1).all(1) & torch.isfinite(std).flatten(1).all(1))
            if bad.any():
                vae32 = self.vae if self.dtype == "float32" else self.load_vae("float32")
                again = vae32.encode(pixels[bad].to(vae32.device, torch.float32)).latent_dist
                mean[bad], std[bad] = again.mean.float(), again.std.float()
                still = ~(torch.isfinite(mean).flatten(1).all(1) & torch.isfinite(std).flatten(1).all(1))
                if still.any():
                    raise ValueError(f"{int(still.sum())} latent(s) are not finite even in float32: "
                                     "the VAE weights are broken")
        return mean.cpu(), std.cpu(), bad.tolist()


def load_pixels(row: dict):
    """The image as the VAE sees it: RGB, EXIF-upright, resized to cover, cropped, in [-1, 1] (C, H, W)."""
    import torch

    from sdxlpipe.engines.images import load_job

    item = load_job({**row, "mask": "none", "latent_factor": LATENT_FACTOR})
    if "error" in item:
        raise OSError(item["error"])
    return torch.from_numpy(item["pixels"]).permute(2, 0, 1).float() / 127.5 - 1.0
