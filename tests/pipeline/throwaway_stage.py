"""A stage that is not sdxlpipe's: one path setting, one output column (tests/pipeline/test_stage_registry.py).

It declares what any stage does and nothing more, so a test run with it in the stage list shows the
pipeline knows a new stage from its module alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

VERSION = 1
OUTPUT_COLUMNS = ("note",)


@dataclass(frozen=True)
class Params:
    # A text file whose content every row carries.
    path: str = field(default="", metadata={"path": True})


def check(p: Params) -> list[tuple[str, str]]:
    return [] if p.path else [("throwaway_stage.path", "must name a file")]


def run(table: pa.Table, params: Params, ctx) -> pa.Table:
    note = Path(params.path).read_text(encoding="utf-8").strip()
    column = pa.array([note] * table.num_rows, pa.string())
    if "note" in table.column_names:
        return table.set_column(table.column_names.index("note"), "note", column)
    return table.append_column("note", column)
