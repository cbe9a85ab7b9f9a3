"""The payload schema (README.md "Payloads"): what an item of sdxlpipe's stages must hold.

A payload that passes its checksum holds the bytes its writer wrote, so one that breaks this
schema is a writer's mistake, not damage: readers refuse it (`PayloadRefused`, a user error
naming the store, stage, item, shard, what is wrong and the fix) and never take it for
corruption, so nothing recomputes it on its own (docs/decisions.md 76). `store verify` lists
such items, and `store verify --repair` marks them bad so the encode stages recompute them.

`problem(stage, field, data)` checks a whole payload; `header_problem` checks a safetensors
header already parsed (training's reader reads the header before the tensors). Only the
(stage, field) pairs of `SCHEMAS` are checked: any other stage or field may hold anything.
"""

from __future__ import annotations

import json
import math
import struct

from .shards import StoreError

# The spec's latent: [4, H/8, W/8] of a bucket W x H (SDXL's VAE, and the tiny model's).
LATENT_CHANNELS = 4
LATENT_FACTOR = 8
# Tensor element types the spec allows (training computes in float32), with their bytes per element.
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
# Element sizes of every safetensors dtype, to check a header's offsets against its shapes.
DTYPE_BYTES = {**FLOAT_DTYPES, "F8_E4M3": 1, "F8_E5M2": 1, "U8": 1, "I8": 1, "BOOL": 1, "U16": 2, "I16": 2,
               "U32": 4, "I32": 4, "U64": 8, "I64": 8}

# (stage, field) -> {tensor name: rank}: the tensors the payload must hold, and ones it may.
SCHEMAS = {
    ("vae_encode", "latent.safetensors"): {"required": {"mean": 3, "std": 3}, "optional": {"mask": 3},
                                           "decimals": ("scaling_factor", "shift_factor")},
    ("text_encode", "text.safetensors"): {"required": {"prompt_embeds": 2, "pooled_prompt_embeds": 1},
                                          "optional": {}, "decimals": ()},
}
JSON_SCHEMAS = {("caption", "caption.json"): "caption"}  # a JSON object with this one text member


class PayloadRefused(StoreError):
    """An item whose payload passes its checksum but breaks the payload schema: refused, not damage.

    `items` is empty (nothing is marked bad, nothing to recompute), so a runner that recomputes
    damaged items lets this error through.
    """

    def __init__(self, store_url: str, stage: str, item_key: str, shard_id: str | None, problem: str):
        self.store_url, self.stage, self.item_key, self.shard_id, self.problem = (
            store_url, stage, item_key, shard_id, problem)
        self.items: dict = {}
        where = f" in shard {shard_id}" if shard_id else ""
        super().__init__(
            f"{store_url}: {stage} item {item_key}{where} breaks the payload schema "
            f"(cache_format/README.md, Payloads): {problem}; refused",
            f"the writer that put it there wrote it wrong (it passes its checksum: not damage). "
            f"`sdxlpipe store verify --repair --store {store_url}` marks every such item bad, and the next "
            f"`sdxlpipe run` re-encodes them; if sdxlpipe's own encode wrote it, report a bug")


def problem(stage: str, field: str, data: bytes, latent_hw: tuple[int, int] | None = None) -> str | None:
    """What makes a whole payload of `stage`'s `field` break the schema; None if it follows it (or the
    pair is not one the schema covers). latent_hw: the latent's (H/8, W/8) its bucket asks for."""
    if (stage, field) in JSON_SCHEMAS:
        return _json_problem(JSON_SCHEMAS[(stage, field)], data)
    if (stage, field) not in SCHEMAS:
        return None
    if len(data) < 8:
        return f"{len(data)} bytes: not a safetensors payload (its length prefix alone is 8)"
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        return f"not a safetensors payload: its header says {size} bytes, {len(data) - 8} follow"
    try:
        header = json.loads(bytes(data[8:8 + size]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        return f"its safetensors header is not JSON ({e})"
    return header_problem(stage, field, header, len(data) - 8 - size, latent_hw)


def header_problem(stage: str, field: str, header, data_bytes: int,
                   latent_hw: tuple[int, int] | None = None) -> str | None:
    """What makes a parsed safetensors header (with `data_bytes` bytes of tensor data after it) break
    the schema of `stage`'s `field`; None if it follows it."""
    schema = SCHEMAS.get((stage, field))
    if schema is None:
        return None
    if not isinstance(header, dict):
        return "its safetensors header is not a JSON object"
    meta = header.get("__metadata__", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        return "its __metadata__ is not a map of text to text"
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    why = _layout_problem(tensors, data_bytes)
    if why:
        return why
    required, optional = schema["required"], schema["optional"]
    missing = [n for n in required if n not in tensors]
    if missing:
        return f"tensor {_names(missing)} missing (it holds {_names(tensors) or 'none'})"
    extra = [n for n in tensors if n not in required and n not in optional]
    if extra:
        return (f"unexpected tensor {_names(extra)} (the spec lists {_names(required)}"
                + (f" and an optional {_names(optional)})" if optional else ")"))
    for name, spec in tensors.items():
        if spec["dtype"] not in FLOAT_DTYPES:
            return f"{name} is {spec['dtype']}, not a float type ({', '.join(FLOAT_DTYPES)})"
        rank = {**required, **optional}[name]
        if len(spec["shape"]) != rank:
            return f"{name} has shape {spec['shape']}, the spec wants {rank} dimensions"
    for key in schema["decimals"]:
        if key in meta and not _is_decimal(meta[key]):
            return f"metadata {key} is {meta[key]!r}, not a finite decimal number"
    if "mean" in required:
        return _latent_problem({n: s["shape"] for n, s in tensors.items()}, latent_hw)
    return None


def _latent_problem(shapes: dict[str, list[int]], latent_hw: tuple[int, int] | None) -> str | None:
    mean = shapes["mean"]
    if mean[0] != LATENT_CHANNELS:
        return f"mean has shape {mean}: {mean[0]} channels, the spec's latents have {LATENT_CHANNELS}"
    if shapes["std"] != mean:
        return f"std has shape {shapes['std']}, mean {mean}: they must agree"
    if "mask" in shapes and shapes["mask"] != [1, *mean[1:]]:
        return f"mask has shape {shapes['mask']}, the latent's wants {[1, *mean[1:]]}"
    if latent_hw is not None and tuple(mean[1:]) != tuple(latent_hw):
        want = [LATENT_CHANNELS, *latent_hw]
        return (f"mean has shape {mean}, its bucket {latent_hw[1] * LATENT_FACTOR}x{latent_hw[0] * LATENT_FACTOR} "
                f"wants {want}")
    return None


def _layout_problem(tensors: dict, data_bytes: int) -> str | None:
    """Each header entry a tensor (dtype, shape, offsets agreeing with each other), together tiling the data."""
    end = 0
    for name, spec in sorted(tensors.items(), key=lambda kv: _start(kv[1])):
        if not (isinstance(spec, dict) and isinstance(spec.get("dtype"), str) and isinstance(spec.get("shape"), list)
                and isinstance(spec.get("data_offsets"), list) and len(spec["data_offsets"]) == 2):
            return f"header entry {name!r} is not a tensor (dtype, shape, data_offsets): {str(spec)[:80]}"
        shape, (lo, hi) = spec["shape"], spec["data_offsets"]
        if not all(type(d) is int and d >= 0 for d in [*shape, lo, hi]):
            return f"tensor {name!r}: shape {shape} or data_offsets {[lo, hi]} not non-negative integers"
        if spec["dtype"] not in DTYPE_BYTES:
            return f"tensor {name!r} has dtype {spec['dtype']!r}, which safetensors does not know"
        if lo != end or hi - lo != math.prod(shape) * DTYPE_BYTES[spec["dtype"]]:
            return f"tensor {name!r}: data_offsets {[lo, hi]} do not match its shape {shape} and the tensors before it"
        end = hi
    if end != data_bytes:
        return f"its tensors hold {end} bytes, the payload {data_bytes}"
    return None


def _start(spec) -> int:
    try:
        return int(spec["data_offsets"][0])
    except (TypeError, KeyError, IndexError, ValueError):
        return -1  # not a tensor: sorted first, and reported


def _json_problem(member: str, data: bytes) -> str | None:
    try:
        doc = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        return f"not JSON ({e})"
    if not isinstance(doc, dict) or not isinstance(doc.get(member), str):
        return f"not a JSON object with a text {member!r} member: {bytes(data[:80]).decode('utf-8', 'replace')}"
    return None


def _is_decimal(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _names(names) -> str:
    return ", ".join(sorted(map(str, names)))
