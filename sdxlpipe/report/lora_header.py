"""What `sdxlpipe lora info` says about a file, read from its safetensors header alone (no torch).

`lora.read.read_lora` loads every tensor with torch; the report needs only
shapes, the alpha scalars and the metadata, which the header and a few bytes
give. Modules are grouped and classified by `lora.read`'s own functions, fed
shape-only stand-ins for the tensors, so the answer is the one `lora info`
prints (a test compares them).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

# safetensors dtype names -> numpy (BF16 is read as the top half of a float32).
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1"}
# A header longer than this is no LoRA (SDXL's ~2k modules need ~300 KB).
MAX_HEADER = 64 << 20


class _Tensor:
    """A tensor's shape and, on demand, its value as a float (alphas are scalars)."""

    def __init__(self, path: Path, start: int, entry: dict):
        self.shape = tuple(entry["shape"])
        self._path, self._dtype = path, entry["dtype"]
        self._begin, self._end = (start + entry["data_offsets"][0], start + entry["data_offsets"][1])

    def dim(self) -> int:
        return len(self.shape)

    def __float__(self) -> float:
        with open(self._path, "rb") as f:
            f.seek(self._begin)
            raw = f.read(min(self._end - self._begin, 8))
        if self._dtype == "BF16":
            return float(np.frombuffer(b"\0\0" + raw[:2], "<f4")[0])
        return float(np.frombuffer(raw, _DTYPES[self._dtype], count=1)[0])


def summary(path: str | Path) -> dict:
    """`lora info --json` for one file, without torch; raises LoraFileError as read_lora does."""
    from sdxlpipe.lora.read import KOHYA_PREFIXES, LoraFile, LoraFileError, _kohya_modules, _peft_modules

    path = Path(path)
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_HEADER:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as e:
        raise LoraFileError(f"{path}: not a readable .safetensors file ({e})", "give a LoRA .safetensors file") from None
    metadata = dict(header.pop("__metadata__", None) or {})
    tensors = {k: _Tensor(path, 8 + size, v) for k, v in header.items()}
    if not tensors:
        raise LoraFileError(f"{path}: the file holds no tensors", "give a LoRA .safetensors file")
    if any(k.startswith(tuple(f"{p}_" for p in KOHYA_PREFIXES)) for k in tensors):
        modules = _kohya_modules(path, tensors)
        fmt = "kohya" if all(m.kind == "lora" for m in modules) else "lycoris"
    else:
        modules, fmt = _peft_modules(path, tensors, metadata)
    kinds = {m.kind for m in modules}
    network = kinds.pop() if len(kinds) == 1 else "mixed"
    if network == "lora" and any(m.conv for m in modules if m.tensors["down"].dim() == 4
                                 and tuple(m.tensors["down"].shape[2:]) != (1, 1)):
        network = "locon"
    return LoraFile(path, fmt, network, modules, metadata, path.stat().st_size).summary()
