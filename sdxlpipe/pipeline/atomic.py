"""The workspace's JSON and parquet files, each written through the one atomic write.

`write_atomic` (cache_format/shards.py): temp file, fsync, rename, fsync the
directory. Files here keep mkstemp's 0600: the workspace is the user's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sdxlpipe.cache_format.shards import write_atomic


def write_json_atomic(obj: Any, path: Path) -> None:
    # Indented, not canonical: people read these (runs, settings, checkpoints' state).
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    write_atomic(path, lambda f: pq.write_table(table, f))
