"""A store from elsewhere is untrusted: crafted rows, members and payloads are refused, and
nothing outside the store is read or written."""

import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import xxhash

from sdxlpipe.cache_format import StoreError, decode_tensors, encode_json, encode_tensors, open_store
from sdxlpipe.cache_format.grammar import GROUPED_SCHEMA, to_parquet

FIELD = "latent.safetensors"
KEY = "0" * 31 + "1"


def _fragment(root: Path, rows: list[tuple]) -> None:
    directory = root / "index" / "vae"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "crafted.parquet").write_bytes(to_parquet(rows, GROUPED_SCHEMA))


def _tar(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _everything_under(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_row_whose_shard_id_walks_out_of_the_store_is_refused_and_never_pulled(tmp_path, caplog):
    secret = b"bytes of a file outside the store"
    (tmp_path / "secret.tar").write_bytes(secret)
    src = tmp_path / "src"
    open_store(str(src))
    (src / "shards" / "vae").mkdir(parents=True)  # so that `..` resolves from there
    _fragment(src, [(KEY, FIELD, "../../../secret", 0, len(secret), xxhash.xxh3_128_hexdigest(secret), "")])

    # The fragment breaks the grammar (shard_id is not 32 hex digits): refused whole, named, its item
    # missing; nothing raises, as the spec says for any fragment that does.
    store = open_store(str(src))
    with caplog.at_level("WARNING"):
        assert store.read("vae", KEY, FIELD) is None
    assert "crafted.parquet" in caplog.text and "refused" in caplog.text
    assert store.missing("vae", [KEY]) == [KEY]
    dst = tmp_path / "dst"
    report = store.copy_missing_to(open_store(str(dst)))
    assert report["vae"]["items"] == 0 and report["vae"]["shards"] == 0
    assert all(secret not in data for data in _everything_under(dst).values())


def test_a_shard_with_a_path_traversal_member_is_not_copied_as_it_is(tmp_path):
    payload = encode_tensors({"mean": np.zeros((4, 2, 2), np.float16)})
    shard = _tar({f"{KEY}.{FIELD}": payload, "../../escaped.latent.safetensors": b"owned"})
    shard_id = xxhash.xxh3_128_hexdigest(shard)
    src = tmp_path / "src"
    open_store(str(src))
    (src / "shards" / "vae").mkdir(parents=True)
    (src / "shards" / "vae" / f"{shard_id}.tar").write_bytes(shard)
    offset = shard.index(payload)
    _fragment(src, [(KEY, FIELD, shard_id, offset, len(payload), xxhash.xxh3_128_hexdigest(payload), "")])

    dst = open_store(str(tmp_path / "dst"))
    open_store(str(src)).copy_missing_to(dst)

    dst.refresh()
    assert dst.read("vae", KEY, FIELD) == payload  # the item came over, re-packed
    names = [m for tar in (tmp_path / "dst" / "shards" / "vae").glob("*.tar")
             for m in tarfile.open(tar).getnames()]
    assert names == [f"{KEY}.{FIELD}"]
    assert not (tmp_path / "escaped.latent.safetensors").exists()
    assert dst.verify() == []


def test_offsets_past_the_end_or_negative_are_refused_and_the_item_counts_as_missing(tmp_path):
    root = tmp_path / "store"
    store = open_store(str(root))
    with store.writer("vae") as w:
        w.add(KEY, FIELD, b"x" * 100)
    (shard_id,) = w.shard_ids
    size = (root / "shards" / "vae" / f"{shard_id}.tar").stat().st_size
    other, negative = "0" * 31 + "2", "0" * 31 + "3"
    _fragment(root, [(other, FIELD, shard_id, size + 512, 100, "0" * 32, ""),
                     (negative, FIELD, shard_id, -512, 100, "0" * 32, "")])

    store = open_store(str(root))
    assert store.read("vae", other, FIELD) is None
    assert dict(store.read_many("vae", [negative, KEY], FIELD)) == {negative: None, KEY: b"x" * 100}
    store.refresh()
    assert store.missing("vae", [other, negative, KEY]) == [other, negative]


def test_a_payload_whose_header_lies_about_its_size_is_refused():
    good = encode_tensors({"mean": np.ones((2, 2), np.float32)})
    (header_len,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + header_len])
    header["mean"]["data_offsets"] = [0, 1 << 40]  # claims a terabyte of tensor data
    text = json.dumps(header).encode()
    lying = struct.pack("<Q", len(text)) + text + good[8 + header_len:]
    for payload in (lying, struct.pack("<Q", 1 << 62) + good[8:], good[:-3]):
        for framework in ("np", "pt"):
            with pytest.raises(ValueError, match="not a safetensors payload"):
                decode_tensors(payload, framework)
    assert encode_json({"ok": 1})  # the codec still works afterwards
