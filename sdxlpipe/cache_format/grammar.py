"""The grammar of index fragments: their schemas, a row as a `Location`, and the checks.

What README.md ("Index fragments", "Bad markers") says a row may hold, as
code: the column schemas, parquet bytes in and out, item keys and shard ids
as numpy 'S32' arrays (with the top 64 bits every lookup searches), and the
vectorised checks every row read from a store passes before any of it is
used to open a path (hex keys and shard ids, plain field names, non-negative
offsets). A fragment with one failing row is refused whole.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

BAD_PREFIX = "bad-"
INDEX_SCHEMA = pa.schema(
    [
        ("item_key", pa.string()),
        ("field", pa.string()),
        ("shard_id", pa.string()),
        ("offset", pa.int64()),
        ("length", pa.int64()),
        ("xxh3", pa.string()),
    ]
)
# Optional 7th column: the model fingerprint the item was made with (for `store du`).
GROUPED_SCHEMA = INDEX_SCHEMA.append(pa.field("group", pa.string()))
# Fragments are read with these columns as dictionaries: parquet stores them so, and the
# codes come without `dictionary_encode`, whose first call imports pyarrow.compute (0.45 s)
# on every no-op run.
CODED = ("shard_id", "field", "group")
_DICT = pa.dictionary(pa.int32(), pa.string())
READ_SCHEMA = pa.schema([pa.field(f.name, _DICT) if f.name in CODED else f for f in GROUPED_SCHEMA])
BAD_SCHEMA = pa.schema([("item_key", pa.string()), ("shard_id", pa.string()), ("fragment", pa.string())])
# Item keys, shard ids and checksums are xxh3-128 in lowercase hex (README.md, "Index fragments").
HEX_LEN = 32


class Location(NamedTuple):
    item_key: str
    field: str
    shard_id: str
    offset: int
    length: int
    xxh3: str
    fragment: str  # file name of the fragment that listed this row
    group: str = ""  # the model fingerprint it was made with, when the writer said

    def row(self) -> tuple:
        """The row as GROUPED_SCHEMA writes it."""
        return (*self[:6], self.group)


def to_parquet(rows: Iterable[tuple], schema: pa.Schema) -> bytes:
    columns = list(zip(*rows)) or [[] for _ in schema]
    table = pa.table([pa.array(list(c), type=f.type) for c, f in zip(columns, schema)], schema=schema)
    return table_bytes(table)


def table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def read_parquet_bytes(data: bytes, dictionary: tuple[str, ...] = ()) -> pa.Table:
    """dictionary: columns to read as dictionary arrays (see CODED), where the file has them."""
    # ParquetFile, not pq.read_table: the latter imports pyarrow.dataset (0.5 s) on every no-op run.
    # use_threads=False: fragments are small and are read many at once on our own threads.
    try:
        return pq.ParquetFile(pa.BufferReader(data), read_dictionary=list(dictionary) or None).read(use_threads=False)
    except KeyError:  # pyarrow's answer to a dictionary column the file lacks: `group` is optional
        names = pq.ParquetFile(pa.BufferReader(data)).schema_arrow.names
        present = [c for c in dictionary if c in names]
        return pq.ParquetFile(pa.BufferReader(data), read_dictionary=present or None).read(use_threads=False)



def hex_column(column, checked: bool = False) -> np.ndarray | None:
    """A string column of 32 lowercase hex digits as a numpy 'S32' array; None if any row is not.

    checked: the rows were already checked (check_rows), skip the pass over the bytes.
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.type == pa.large_string():
        arr = arr.cast(pa.string())
    if arr.type != pa.string() or arr.null_count:
        return None
    n = len(arr)
    if n == 0:
        return np.zeros(0, "S32")
    offsets = np.frombuffer(arr.buffers()[1], np.int32, n + 1, arr.offset * 4)
    if not (np.diff(offsets) == HEX_LEN).all():
        return None
    start = int(offsets[0])
    raw = np.frombuffer(arr.buffers()[2], np.uint8, n * HEX_LEN, start)
    if not checked and not _all_hex(raw):
        return None
    return raw.view(f"S{HEX_LEN}")


def _hex_bytes(raw: np.ndarray) -> np.ndarray:
    """Per byte: is it one of 0-9a-f? (uint8 arithmetic wraps, so each test is one compare.)"""
    return ((raw - np.uint8(48)) < 10) | ((raw - np.uint8(97)) < 6)


def _all_hex(raw: np.ndarray) -> bool:
    # In blocks, so that the temporaries stay small at a million keys.
    block = 1 << 22
    return all(_hex_bytes(raw[i:i + block]).all() for i in range(0, len(raw), block))


def keys_array(keys) -> np.ndarray:
    """Query keys (any iterable of str) as 'S32'; a key that is not 32 hex digits becomes b'' (absent)."""
    if isinstance(keys, np.ndarray) and keys.dtype == np.dtype("S32"):
        return keys
    keys = list(keys)
    # One join instead of pa.array(list), whose first call imports pandas (1.4 s) on the no-op path.
    try:
        joined = "".join(keys).encode()
    except (TypeError, UnicodeEncodeError):
        joined = b""
    if len(joined) == HEX_LEN * len(keys) and (np.fromiter(map(len, keys), np.int64, len(keys)) == HEX_LEN).all():
        raw = np.frombuffer(joined, np.uint8)  # equal byte and char counts: all ASCII
        if _all_hex(raw):
            return raw.view(f"S{HEX_LEN}") if len(keys) else np.zeros(0, "S32")
    return np.array([k.encode() if is_key(k) else b"" for k in keys], "S32")


def is_key(key) -> bool:
    """Is `key` an item key (or shard id) of the grammar: 32 lowercase hex digits?"""
    return isinstance(key, str) and len(key) == HEX_LEN and all(c in "0123456789abcdef" for c in key)


def top64(keys: np.ndarray, low: bool = False) -> np.ndarray:
    """The first (low: last) 16 hex digits of each 'S32' key as uint64: the sort and search key."""
    if len(keys) == 0:
        return np.zeros(0, np.uint64)
    chars = keys.view(np.uint8).reshape(-1, HEX_LEN)[:, 16:] if low else keys.view(np.uint8).reshape(-1, HEX_LEN)[:, :16]
    # '0'-'9' -> 0-9, 'a'-'f' -> 10-15; b'' (a query key that is not hex) gives some value,
    # and its full key never matches.
    nib = (chars & np.uint8(15)) + np.uint8(9) * (chars >> np.uint8(6))
    packed = np.ascontiguousarray((nib[:, 0::2] << np.uint8(4)) | nib[:, 1::2])
    return packed.view(">u8").reshape(-1).astype(np.uint64)


def as_numpy(arr: pa.Array) -> np.ndarray:
    """A null-free integer or boolean Arrow array as numpy, straight from its buffer.

    Not to_numpy(zero_copy_only=False): that path imports pandas (1.4 s) on the no-op path.
    """
    n = len(arr)
    if pa.types.is_boolean(arr.type):
        bits = np.frombuffer(arr.buffers()[1], np.uint8) if n else np.zeros(0, np.uint8)
        return np.unpackbits(bits, bitorder="little")[arr.offset:arr.offset + n].astype(bool)
    dtype = np.dtype(str(arr.type))  # int8 ... uint64: the same names in both
    return np.frombuffer(arr.buffers()[1], dtype, n, arr.offset * dtype.itemsize) if n \
        else np.zeros(0, dtype)


def plain_name(text) -> bool:
    return bool(text) and not any(c in text for c in "/\\\0") and not text.startswith(".")


def _hex_rows(column, chars: bool | str = True) -> np.ndarray:
    """Per row of a string column: is it 32 lowercase hex digits? (One pass over the bytes.)

    chars False: 32 bytes of anything; "ascii": 32 ASCII characters (one compare per byte).
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if n == 0:
        return np.zeros(0, bool)
    offsets = np.frombuffer(arr.buffers()[1], np.int32, n + 1, arr.offset * 4)
    ok = np.diff(offsets) == HEX_LEN
    if arr.null_count:
        ok &= as_numpy(arr.is_valid())
    start, end = int(offsets[0]), int(offsets[-1])
    if chars == "ascii" and end > start:
        data = np.frombuffer(arr.buffers()[2], np.uint8, end - start, start)
        wrong = np.flatnonzero(data >= 128) + start
        ok[np.searchsorted(offsets, wrong, "right") - 1] = False
    elif chars and end > start:
        data = np.frombuffer(arr.buffers()[2], np.uint8, end - start, start)
        if not _all_hex(data):
            wrong = np.flatnonzero(~_hex_bytes(data)) + start
            ok[np.searchsorted(offsets, wrong, "right") - 1] = False
    return ok


def type_problem(table: pa.Table, text: tuple[str, ...], integers: tuple[str, ...] = ()) -> str | None:
    """Why a column of `table` breaks the README's types, or None: text columns are parquet UTF-8
    (Arrow string or large_string, dictionary-encoded or not; an all-null column may be typed null),
    integer columns any integer type. A cast would take more (numbers from text, floats, booleans),
    and a row read that way would not be what its writer meant."""
    for name in table.column_names:
        kind = table.schema.field(name).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if name in text and not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            return f"column {name} is of type {kind}, not text"
        if name in integers and not (pa.types.is_integer(kind) or pa.types.is_null(kind)):
            return f"column {name} is of type {kind}, not an integer"
    return None


def prepare(table: pa.Table) -> tuple[pa.Table | None, str | None]:
    """A fragment's table in READ_SCHEMA (group "" when absent), or None and why not."""
    lacking = [n for n in INDEX_SCHEMA.names if n not in table.column_names]
    if lacking:
        return None, f"columns {lacking} missing"
    wrong = type_problem(table, ("item_key", "field", "shard_id", "xxh3", "group"), ("offset", "length"))
    if wrong:
        return None, wrong
    if "group" not in table.column_names:
        table = table.append_column("group", pa.nulls(table.num_rows, _DICT))
    table = table.select(READ_SCHEMA.names)
    if table.schema != READ_SCHEMA:  # this process's own writes, or another writer's types
        try:
            table = table.cast(READ_SCHEMA)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            return None, f"columns of the wrong type ({e})"
    return table, None


def check_rows(table: pa.Table, frag: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """Rows of GROUPED_SCHEMA against the grammar in README.md, all fragments at once.

    Returns the per-row verdict and, per fragment code with a failing row, why
    (the first rule it breaks).
    """
    ok = np.ones(table.num_rows, bool)
    why: dict[int, str] = {}

    def fail(bad: np.ndarray, reason: str) -> None:
        if not bad.any():  # np.unique would import numpy.ma (0.13 s) on the no-op path
            return
        for code in np.unique(frag[bad]).tolist():
            why.setdefault(code, reason)
        ok[bad] = False

    fail(~_hex_rows(table.column("item_key")), f"column item_key holds a value that is not {HEX_LEN} lowercase hex digits")
    shards = table.column("shard_id").combine_chunks()
    fail(~np.append(_hex_rows(shards.dictionary), False)[dict_codes(shards)],
         f"column shard_id holds a value that is not {HEX_LEN} lowercase hex digits")
    # A checksum is only ever compared with a digest, never used as a name: its length suffices,
    # in ASCII (it becomes a str; hex would cost ~10x the pass over the bytes).
    fail(~_hex_rows(table.column("xxh3"), chars="ascii"),
         f"column xxh3 holds a value that is not {HEX_LEN} ASCII characters")
    for col in ("offset", "length"):
        values = table.column(col).combine_chunks()
        bad = as_numpy(values) < 0  # null slots hold anything: they fail on their own below
        if values.null_count:  # fill_null is slow (~0.1 s per million): only when needed
            bad |= ~as_numpy(values.is_valid())
        fail(bad, f"column {col} holds a null or negative value")
    fields = table.column("field").combine_chunks()
    wrong = np.array([not plain_name(f) for f in texts(fields.dictionary)] + [True], bool)  # last: null
    fail(wrong[dict_codes(fields)], "column field holds a null or a name that is not a plain member name "
                       "(no '/', '\\', leading '.')")
    groups = table.column("group").combine_chunks()
    if len(groups.dictionary):
        wrong = np.array([g is None for g in texts(groups.dictionary)] + [False], bool)  # last: null, allowed
        fail(wrong[dict_codes(groups)], "column group holds a value that is not UTF-8 text")
    return ok, why


def texts(arr: pa.Array) -> list:
    """A string array's values as str; None where the bytes are not UTF-8 (parquet does not check)."""
    try:
        return arr.to_pylist()
    except UnicodeDecodeError:  # a damaged or crafted file: each such value fails its rule
        out = []
        for i in range(len(arr)):
            try:
                out.append(arr[i].as_py())
            except UnicodeDecodeError:
                out.append(None)
        return out


def dict_codes(arr: pa.DictionaryArray) -> np.ndarray:
    """A dictionary array's indices as numpy, a null slot as len(dictionary)."""
    codes = as_numpy(arr.indices)
    if arr.null_count:
        valid = np.unpackbits(np.frombuffer(arr.buffers()[0], np.uint8), bitorder="little")
        codes = np.where(valid[arr.offset:arr.offset + len(arr)].astype(bool), codes, len(arr.dictionary))
    return codes


def check_markers(table: pa.Table) -> tuple[list | None, str | None]:
    lacking = [n for n in BAD_SCHEMA.names if n not in table.column_names]
    if lacking:
        return None, f"columns {lacking} missing"
    wrong = type_problem(table, BAD_SCHEMA.names)
    if wrong:
        return None, wrong
    table = table.select(BAD_SCHEMA.names)
    if table.schema != BAD_SCHEMA:  # dictionary-encoded, large_string or all-null text: as plain strings
        table = table.cast(BAD_SCHEMA)
    for col in ("item_key", "shard_id"):
        if hex_column(table.column(col)) is None:
            return None, f"column {col} holds a value that is not {HEX_LEN} lowercase hex digits"
    fragments = texts(table.column("fragment").combine_chunks())
    if not all(plain_name(f) for f in fragments):
        return None, "column fragment holds a path, not a fragment's file name"
    return list(zip(table.column("item_key").to_pylist(), table.column("shard_id").to_pylist(), fragments)), None

