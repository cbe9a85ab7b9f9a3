"""A manifest: jsonl, csv or parquet with an image path column and a caption column.

Paths are relative to the manifest's folder (absolute paths are kept). A
caption file beside an image still wins over the column (the order is
sidecar, column, stem, prompt).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

from sdxlpipe.datasets.base import Candidate, fallback_caption
from sdxlpipe.datasets.sidecars import find_sidecar
from sdxlpipe.errors import UserError

MANIFEST_EXTENSIONS = (".jsonl", ".csv", ".parquet")


def read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not a JSON object ({e})", "fix or remove that line of the manifest")
    return rows


def read_manifest(path: Path, *, subset: str, repeats: int, image_column: str, caption_column: str,
                  prompt: str, stem_captions: bool) -> Iterator[Candidate]:
    rows = read_rows(path)
    if rows and image_column not in rows[0]:
        raise UserError(
            f"{path}: no column {image_column!r} (columns: {', '.join(map(str, rows[0]))})",
            "set image_column (and caption_column) in this [[sources]] entry to the manifest's column names",
        )
    base = path.parent
    for n, row in enumerate(rows):
        value = row.get(image_column)
        if not isinstance(value, str) or not value:
            yield Candidate(rel=f"row {n}", display=f"{path} row {n}", source="", subset=subset, repeats=repeats,
                            reject=f"no image path in column {image_column!r}")
            continue
        image = Path(value) if Path(value).is_absolute() else base / value
        column = row.get(caption_column)
        column = str(column).strip() if column is not None and str(column).strip() else None
        sidecar = find_sidecar(image) if image.is_file() else None
        default, origin = fallback_caption(image.stem, prompt, stem_captions)
        yield Candidate(
            rel=value, display=str(image), source=str(image.absolute()), subset=subset, repeats=repeats,
            sidecar_caption=sidecar if sidecar is not None else column,
            caption_origin="sidecar" if sidecar is not None else ("column" if column is not None else origin),
            default_caption=default, file=image,
            reject=None if image.is_file() else f"listed in {path.name} but the file does not exist",
        )
