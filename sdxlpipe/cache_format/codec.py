"""Payload codec: the bytes an item field holds in a shard.

Owns the two payload kinds the store accepts: safetensors (named tensors plus
string metadata) and canonical JSON. Nothing here ever unpickles: a shard
may come from another machine, so it is untrusted input. numpy, safetensors
and torch are imported only inside the functions that need them, so that
importing the store stays cheap.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Mapping

FRAMEWORKS = ("np", "pt")


def _is_torch(value: Any) -> bool:
    # Checking the module name avoids importing torch just to ask isinstance.
    return type(value).__module__.startswith("torch")


def _is_numpy(value: Any) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ == "ndarray"


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(
            f"safetensors metadata must map str to str; entries {bad[:5]} do not. "
            "Convert values with str() or encode_json(...).decode()."
        )
    return dict(metadata)


def encode_tensors(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize named numpy arrays or torch tensors (mixing is fine) to safetensors bytes."""
    meta = _check_metadata(metadata)
    refused = {k: type(v).__qualname__ for k, v in tensors.items() if not (_is_numpy(v) or _is_torch(v))}
    if refused:
        raise TypeError(
            f"encode_tensors takes numpy arrays or torch tensors; got {refused}. "
            "Wrap scalars with numpy.asarray(...); store other data with encode_json."
        )
    if any(_is_torch(v) for v in tensors.values()):
        import torch
        from safetensors.torch import save

        # safetensors wants contiguous CPU tensors; numpy arrays join as tensors.
        as_torch = {
            k: (v.detach().cpu().contiguous() if _is_torch(v) else torch.from_numpy(v.copy()))
            for k, v in tensors.items()
        }
        return canonical_safetensors(save(as_torch, metadata=meta))
    import numpy as np
    from safetensors.numpy import save

    return canonical_safetensors(save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=meta))


def canonical_safetensors(data: bytes) -> bytes:
    """The same payload with its JSON header in sorted-key order.

    safetensors writes the header from a hash map, so key order (metadata
    included) differs between processes. Shards are named by their bytes, and
    two machines encoding the same items must write the same shard.
    Offsets in the header are relative to the data, so only the header moves.
    """
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    text = encode_json(header)
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8-byte alignment with spaces
    return struct.pack("<Q", len(text)) + text + data[8 + header_len :]


def read_metadata(data: bytes) -> dict[str, str]:
    """The "__metadata__" of a safetensors payload, read from its header."""
    if len(data) < 8:
        raise ValueError(f"not a safetensors payload: {len(data)} bytes, the header needs 8")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise ValueError(
            f"not a safetensors payload: header says {header_len} bytes, only {len(data) - 8} follow"
        )
    header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("not a safetensors payload: the header is not a JSON object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("safetensors __metadata__ must map str to str")
    return meta


def decode_tensors(data: bytes, framework: str = "np") -> tuple[dict, dict[str, str]]:
    """Tensors and metadata from safetensors bytes; framework "np" (numpy) or "pt" (torch)."""
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
    meta = read_metadata(data)
    if framework == "pt":
        from safetensors.torch import load
    else:
        from safetensors.numpy import load
    try:
        return load(bytes(data)), meta
    except Exception as e:  # safetensors raises its own SafetensorError for lying headers
        raise ValueError(f"not a safetensors payload: {e}") from e


def canonical_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, no spaces, UTF-8 kept, no NaN, so equal objects give equal text.

    The one canonical form of sdxlpipe: item keys (pipeline/keys.py), model fingerprints,
    manifests and JSON payloads all hash or store it, so it must never change.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_json(obj: Any) -> bytes:
    """A JSON payload: canonical_json's UTF-8 bytes."""
    return canonical_json(obj).encode("utf-8")


def decode_json(data: bytes) -> Any:
    return json.loads(bytes(data).decode("utf-8"))
