"""Caption: the text each image is trained with.

Recipe: sidecar caption, else the file name's stem (underscores as spaces)
-> prefix and suffix -> one `caption` per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

VERSION = 1
OUTPUT_COLUMNS = ("caption",)


@dataclass(frozen=True)
class Params:
    # Prepended to every caption, e.g. a trigger word "sks dog, ".
    caption_prefix: str = ""
    # Appended to every caption.
    caption_suffix: str = ""


def run(table: pa.Table, params: Params, ctx) -> pa.Table:
    sidecars = table.column("sidecar_caption").to_pylist()
    sources = table.column("source").to_pylist()
    captions = []
    for sidecar, source in zip(sidecars, sources):
        text = sidecar if sidecar else Path(source).stem.replace("_", " ")
        captions.append(f"{params.caption_prefix}{text}{params.caption_suffix}")
    return table.append_column("caption", pa.array(captions, pa.string()))
