"""Which items are held out of training for the validation loss (torch-free: `status` and the report use it).

An item is held out when it comes from a `kind = "validation"` source (the
table's `validation` column), or when `train.validation_split` picks it: the
item's sample key (subset + path inside its source, never its bytes or its
position) hashed to a number in [0, 1) below the fraction. So the held-out set
is stable as the dataset grows (adding images never moves an old one in or
out), the same for every seed and every setting (runs that differ in anything
else are compared on the same items), and the same on every machine.
"""

from __future__ import annotations

import pyarrow as pa
import xxhash

# The column ingest writes for items of a `kind = "validation"` source.
COLUMN = "validation"


def picked(key: str, fraction: float) -> bool:
    """Whether `validation_split = fraction` holds out the item with this sample key."""
    return fraction > 0 and xxhash.xxh3_64_intdigest(f"validation-split/{key}".encode()) / 2**64 < fraction


def held_out_mask(table: pa.Table, fraction: float) -> list[bool]:
    """Per row of a stage table: held out of training (a validation source's item, or picked by the split)."""
    keys = table.column("key").to_pylist() if "key" in table.column_names else [None] * table.num_rows
    sourced = table.column(COLUMN).to_pylist() if COLUMN in table.column_names else [False] * table.num_rows
    return [bool(v) or (k is not None and picked(k, fraction)) for k, v in zip(keys, sourced)]


def split(table: pa.Table, fraction: float) -> tuple[pa.Table, pa.Table]:
    """(the rows that train, the rows held out for the validation loss), each in the table's order."""
    mask = held_out_mask(table, fraction)
    if not any(mask):
        return table, table.slice(0, 0)
    return table.filter(pa.array([not m for m in mask])), table.filter(pa.array(mask))
