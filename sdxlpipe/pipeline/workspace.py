"""The workspace: `.sdxlpipe/` beside the config, local to one checkout.

It holds the stage tables (parquet), the content-hash and caption memos,
training runs, run records and the no-op record (`.noop.json`, pipeline/noop.py). The store may be shared; the workspace never needs to be.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sdxlpipe.pipeline.atomic import write_json_atomic, write_parquet_atomic


@dataclass(frozen=True)
class Workspace:
    root: Path

    def table_path(self, stage: str) -> Path:
        return self.root / "tables" / f"{stage}.parquet"

    def read_table(self, stage: str) -> pa.Table | None:
        path = self.table_path(stage)
        if not path.exists():
            return None
        try:
            return pq.ParquetFile(path).read()  # not pq.read_table: it imports pyarrow.dataset (0.5 s)
        except (OSError, pa.ArrowInvalid):
            return None  # a damaged table only costs a recomputed diff

    def write_table(self, stage: str, table: pa.Table) -> None:
        write_parquet_atomic(table, self.table_path(stage))

    def read_settings(self, stage: str) -> dict | None:
        """The params and weight fingerprints the stage last ran with (for `status` reasons)."""
        path = self.root / "tables" / f"{stage}.settings.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def write_settings(self, stage: str, settings: dict) -> None:
        write_json_atomic(settings, self.root / "tables" / f"{stage}.settings.json")

    @property
    def memo_path(self) -> Path:
        return self.root / "memo" / "content_hash.parquet"

    @property
    def sidecar_memo_path(self) -> Path:
        return self.root / "memo" / "sidecar_text.parquet"

    def train_dir(self, train_key: str) -> Path:
        return self.root / "train" / train_key

    def write_record(self, name: str, record: dict) -> Path:
        path = self.root / "records" / f"{name}.json"
        write_json_atomic(record, path)
        return path
