"""Item keys: xxh3-128 of the canonical JSON of everything that shapes an item.

A key document never holds a path, a timestamp, a learning rate that does not
shape the item, or an output directory. The document itself is
kept beside the key where a stage wants `status` to explain a change.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import xxhash

from sdxlpipe.cache_format.codec import canonical_json


def xxh3_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return xxhash.xxh3_128_hexdigest(data)


def item_key(doc: dict[str, Any]) -> str:
    return xxh3_hex(canonical_json(doc))


def item_keys(fixed: dict[str, Any], columns: dict[str, Any]) -> list[str]:
    """`item_key({**fixed, name: value of row i for each column})` for every row i, bit for bit,
    at ~3 us a row instead of ~15: the canonical JSON is a %-template, filled per row.

    columns: top-level key -> one value per row (a list, or an Arrow array: read in
    blocks, so a 10M-row table never becomes 10M Python objects per column), or a
    tuple of such columns for a key whose value is a JSON array per row
    ("resize": (widths, heights) -> [w,h]). Ints and strings that need no JSON
    escaping go straight into the template; any other value (floats, None, nested
    data, strings with quotes or control characters) is rendered by canonical_json,
    so the key is always item_key's.
    """
    flat = [c for spec in columns.values() for c in (spec if isinstance(spec, tuple) else (spec,))]
    lengths = {len(c) for c in flat}
    if len(lengths) > 1:
        raise ValueError(f"item_keys: columns of different lengths {sorted(lengths)}")
    if not flat:
        return [item_key(fixed)]
    out: list[str] = []
    for start in range(0, lengths.pop(), KEY_BLOCK):
        block = {name: tuple(_block(c, start) for c in spec) if isinstance(spec, tuple) else _block(spec, start)
                 for name, spec in columns.items()}
        out += _keys_of_block(fixed, block)
    return out


# Rows per block of item_keys: bounds the Python objects made from Arrow columns at once.
KEY_BLOCK = 1 << 16


def _block(column, start: int) -> list:
    if hasattr(column, "to_pylist"):
        return column.slice(start, KEY_BLOCK).to_pylist()
    return list(column[start:start + KEY_BLOCK])


def _keys_of_block(fixed: dict[str, Any], columns: dict[str, Any]) -> list[str]:
    pieces, slots = [], []
    for name in sorted({**fixed, **columns}):
        head = canonical_json(name).replace("%", "%%") + ":"
        if name not in columns:
            pieces.append(head + canonical_json(fixed[name]).replace("%", "%%"))
            continue
        spec = columns[name]
        parts = [_slot(c) for c in (spec if isinstance(spec, tuple) else (spec,))]
        inner = ",".join(fmt for fmt, _ in parts)
        pieces.append(head + (f"[{inner}]" if isinstance(spec, tuple) else inner))
        slots += [values for _, values in parts]
    template = "{" + ",".join(pieces) + "}"
    digest = xxhash.xxh3_128_hexdigest
    return [digest((template % row).encode()) for row in zip(*slots)]


_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]')


def _slot(values: Sequence) -> tuple[str, Sequence]:
    """(format of one JSON value, the values to fill it with) for a column."""
    values = list(values)
    if all(type(v) is int for v in values):  # not bool: JSON writes true, %d would write 1
        return "%d", values
    if all(type(v) is str for v in values) and not _NEEDS_ESCAPE.search("".join(values)):
        return '"%s"', values
    return "%s", [canonical_json(v) for v in values]


def partition_of(key: str, count: int) -> int:
    """Which of `count` partitions an item key falls in (for `--shards K/N`).

    Keys are uniform hex, so the top 64 bits split evenly.
    """
    return int(key[:16], 16) % count


def keys_in_columns(table, columns: Sequence[str]) -> list[str]:
    """Every store key the table's `columns` name (list columns flattened, nulls and "" left out), each
    once, in order: the items of a stage's STORE_COLUMNS a run relies on. Absent columns name none."""
    found: dict[str, None] = {}
    for column in columns:
        if column in table.column_names:
            for value in table.column(column).to_pylist():
                found.update(dict.fromkeys(v for v in (value if isinstance(value, list) else [value]) if v))
    return list(found)
