"""The spec (cache_format/README.md) is the contract: a store written from it alone is read by
`store verify`, `store pull` and training, and a fragment that breaks its grammar is refused
whole, named, and never crashes anything.

`write_spec_store` below is a minimal writer made from the spec only: tarfile, pyarrow,
xxhash and json, no sdxlpipe import. It makes its own legal choices where the spec leaves
them open: member order, how items group into shards, several shards per fragment, its own
fragment names, and fragments without the optional `group` column.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import struct
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash

from sdxlpipe.cache_format import StoreError, open_store
from tests.conftest import EXAMPLE, cli

# --- the independent writer: the spec, and nothing of sdxlpipe ---------------------------------


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                len(data), 0, 0o644, 0, 0, "", "")
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def write_spec_store(root: Path, items: dict[str, list[tuple[str, str, bytes]]], *, per_shard: int = 2,
                     shards_per_fragment: int = 2) -> dict[str, list[str]]:
    """Write `items` ({stage: [(item_key, field, payload)]}) as a store, the spec's way; returns
    {stage: [fragment names]}. Items go in reverse key order, `per_shard` items a shard, and
    `shards_per_fragment` shards share one fragment named `from-elsewhere-<n>.parquet`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "FORMAT").write_bytes(b"sdxlpipe-store 1\n")
    fragments = {}
    for stage, rows in items.items():
        (root / "shards" / stage).mkdir(parents=True, exist_ok=True)
        (root / "index" / stage).mkdir(parents=True, exist_ok=True)
        by_key: dict[str, list[tuple[str, bytes]]] = {}
        for key, field, payload in rows:
            by_key.setdefault(key, []).append((field, payload))
        keys = sorted(by_key, reverse=True)
        index_rows: list[list[dict]] = []
        for start in range(0, len(keys), per_shard):
            # An item's fields are consecutive members of one shard.
            members = [(f"{k}.{f}", p) for k in keys[start:start + per_shard] for f, p in sorted(by_key[k])]
            data = _tar(members)
            shard_id = xxhash.xxh3_128_hexdigest(data)
            (root / "shards" / stage / f"{shard_id}.tar").write_bytes(data)
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                where = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
            listed = [{"name": n, "offset": where[n][0], "length": where[n][1], "xxh3": xxhash.xxh3_128_hexdigest(p)}
                      for n, p in members]
            (root / "shards" / stage / f"{shard_id}.json").write_bytes(_canonical({
                "format": 1, "stage": stage, "items": len({n.split(".", 1)[0] for n, _ in members}),
                "bytes": len(data), "xxh3": shard_id, "members": listed}))
            index_rows.append([{"item_key": m["name"].split(".", 1)[0], "field": m["name"].split(".", 1)[1],
                                "shard_id": shard_id, "offset": m["offset"], "length": m["length"],
                                "xxh3": m["xxh3"]} for m in listed])
        fragments[stage] = []
        for n, start in enumerate(range(0, len(index_rows), shards_per_fragment)):
            rows_ = [r for shard in index_rows[start:start + shards_per_fragment] for r in shard]
            name = f"from-elsewhere-{n}.parquet"
            write_fragment(root / "index" / stage / name, rows_)
            fragments[stage].append(name)
    return fragments


def write_fragment(path: Path, rows: list[dict], types: dict | None = None) -> None:
    """An index fragment with exactly the spec's six required columns (string, int64), in its own
    column order; `types` overrides a column's Arrow type."""
    schema = {"xxh3": pa.string(), "length": pa.int64(), "offset": pa.int64(), "shard_id": pa.string(),
              "field": pa.string(), "item_key": pa.string(), **(types or {})}
    table = pa.table({c: pa.array([r[c] for r in rows], t) for c, t in schema.items() if c in (rows[0] if rows else schema)})
    pq.write_table(table, path)


def safetensors(tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors payload by hand: {name: (dtype, shape, raw bytes)}, header keys sorted, padded to 8."""
    header, data = {}, b""
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata:
        header["__metadata__"] = metadata
    text = _canonical(header)
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


# --- a small store written from the spec --------------------------------------------------------

KEYS = [xxhash.xxh3_128_hexdigest(f"item {i}".encode()) for i in range(7)]


def spec_items() -> dict[str, list[tuple[str, str, bytes]]]:
    latents = [(k, "latent.safetensors", safetensors(
        {"mean": ("F16", [4, 2, 2], bytes([i]) * 32), "std": ("F16", [4, 2, 2], bytes([i + 1]) * 32)},
        {"scaling_factor": "0.13025", "shift_factor": "0.0"})) for i, k in enumerate(KEYS[:5])]
    # An item with two fields, one of them JSON, and a long field name (a pax header in the tar).
    extra = [(KEYS[5], "json", _canonical({"note": "two fields"})),
             (KEYS[5], "a." + "long" * 30 + ".safetensors", safetensors({"x": ("U8", [3], b"abc")})),
             (KEYS[6], "caption.json", _canonical({"caption": "a red square"}))]
    return {"vae_encode": latents, "other": extra}


def read_all(store, items) -> dict:
    return {(stage, k, f): store.read(stage, k, f) for stage, rows in items.items() for k, f, _ in rows}


def expected(items) -> dict:
    return {(stage, k, f): p for stage, rows in items.items() for k, f, p in rows}


def test_a_store_written_from_the_spec_alone_verifies_reads_and_pulls(tmp_path):
    items = spec_items()
    fragments = write_spec_store(tmp_path / "b", items, per_shard=2, shards_per_fragment=2)
    assert len(fragments["vae_encode"]) == 2  # 3 shards: 2 + 1 per fragment

    verified = cli("store", "verify", "--store", str(tmp_path / "b"), "--json", check=False)
    assert verified.returncode == 0 and json.loads(verified.stdout) == {"problems": []}, verified.stderr
    pulled = cli("store", "pull", str(tmp_path / "b"), str(tmp_path / "c"), "--json", check=False)
    assert pulled.returncode == 0, pulled.stderr
    assert "Traceback" not in pulled.stderr and "refused" not in pulled.stderr
    report = json.loads(pulled.stdout)
    assert report["vae_encode"]["items"] == 5 and report["other"]["items"] == 2

    assert read_all(open_store(str(tmp_path / "b"), create=False), items) == expected(items)
    copy = open_store(str(tmp_path / "c"), create=False)
    assert read_all(copy, items) == expected(items)
    assert copy.verify() == []


def test_the_stores_own_writer_writes_what_the_spec_says(tmp_path):
    """The other direction: each file sdxlpipe writes holds what the spec lists, and no more."""
    store = open_store(str(tmp_path))
    items = spec_items()
    for stage, rows in items.items():
        with store.writer(stage, group="vae:abc" if stage == "vae_encode" else "") as w:
            for key, field, payload in rows:
                w.add(key, field, payload)
    assert (tmp_path / "FORMAT").read_bytes() == b"sdxlpipe-store 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FORMAT", "index", "shards", "tmp"]
    assert list((tmp_path / "tmp").iterdir()) == []
    for stage in items:
        (tar,) = (tmp_path / "shards" / stage).glob("*.tar")
        manifest = json.loads((tar.with_suffix(".json")).read_bytes())
        assert tar.with_suffix(".json").read_bytes() == _canonical(manifest)
        assert set(manifest) == {"format", "stage", "items", "bytes", "xxh3", "members"}
        assert (manifest["format"], manifest["stage"], manifest["xxh3"]) == (1, stage, tar.stem)
        assert manifest["bytes"] == tar.stat().st_size and tar.stem == xxhash.xxh3_128_hexdigest(tar.read_bytes())
        assert all(set(m) == {"name", "offset", "length", "xxh3"} for m in manifest["members"])
        (fragment,) = (tmp_path / "index" / stage).glob("*.parquet")
        assert fragment.name == f"{tar.stem}.parquet"
        table = pq.read_table(fragment)
        assert table.schema.names == ["item_key", "field", "shard_id", "offset", "length", "xxh3", "group"]
        assert [str(t) for t in table.schema.types] == ["string"] * 3 + ["int64"] * 2 + ["string"] * 2
        assert set(table.column("group").to_pylist()) == {"vae:abc" if stage == "vae_encode" else ""}


# --- grammar violations: refused whole, named, nothing crashes ----------------------------------

def _violating(stage_dir: Path, name: str, violation: str, good_row: dict) -> None:
    """A fragment `name` holding `good_row` (a real, intact location) and the violation."""
    path = stage_dir / name
    bad = dict(good_row)
    types = None
    if violation == "unparsable parquet":
        path.write_bytes(b"PAR1 this is not parquet PAR1")
        return
    if violation == "truncated parquet":
        write_fragment(path, [good_row])
        path.write_bytes(path.read_bytes()[:-12])
        return
    if violation == "item_key not hex":
        bad["item_key"] = "Z" * 32
    elif violation == "item_key uppercase":
        bad["item_key"] = good_row["item_key"].upper()
    elif violation == "shard_id walks out":
        bad["shard_id"] = "../../../" + good_row["shard_id"][9:]
    elif violation == "field is a path":
        bad["field"] = "../latent.safetensors"
    elif violation == "field starts with a dot":
        bad["field"] = ".hidden"
    elif violation == "negative offset":
        bad["offset"] = -1
    elif violation == "null length":
        bad["length"] = None
    elif violation == "xxh3 too short":
        bad["xxh3"] = "abc"
    elif violation == "xxh3 not ASCII":
        bad["xxh3"] = "é" * 16  # 32 bytes of UTF-8
    elif violation == "field not UTF-8":
        # Parquet does not check UTF-8: bytes patched into a plain (unencoded, uncompressed) page.
        table = pa.table({c: pa.array([good_row[c], {**bad, "field": "qqqqqqqq"}[c]]) for c in good_row})
        pq.write_table(table, path, use_dictionary=False, compression="none", write_statistics=False,
                       store_schema=False)
        data = path.read_bytes()
        assert data.count(b"qqqqqqqq") == 1
        path.write_bytes(data.replace(b"qqqqqqqq", b"\xffqqqqqqq"))
        return
    elif violation == "missing column":
        table = pa.table({c: pa.array([good_row[c]]) for c in ("item_key", "field", "shard_id", "offset", "length")})
        pq.write_table(table, path)
        return
    elif violation == "offset as text":
        types = {"offset": pa.string()}
        good_row, bad = {**good_row, "offset": str(good_row["offset"])}, {**bad, "offset": str(bad["offset"])}
    elif violation == "length as float":
        types = {"length": pa.float64()}
    elif violation == "item_key as integer":
        types = {"item_key": pa.int64()}
        good_row, bad = {**good_row, "item_key": 7}, {**bad, "item_key": 8}
    elif violation == "field as binary":
        types = {"field": pa.binary()}
        good_row, bad = {**good_row, "field": good_row["field"].encode()}, {**bad, "field": b"json"}
    elif violation == "group as integer":
        table = pa.table({**{c: pa.array([good_row[c]]) for c in good_row}, "group": pa.array([3])})
        pq.write_table(table, path)
        return
    else:
        raise AssertionError(violation)
    write_fragment(path, [good_row, bad], types)


VIOLATIONS = ["unparsable parquet", "truncated parquet", "item_key not hex", "item_key uppercase",
              "shard_id walks out", "field is a path", "field starts with a dot", "negative offset", "null length",
              "xxh3 too short", "xxh3 not ASCII", "field not UTF-8", "missing column", "offset as text", "length as float", "item_key as integer",
              "field as binary", "group as integer"]


def _store_with_crafted(root: Path, violations: list[str]) -> tuple[dict, dict]:
    """A spec store whose last item (KEYS[4]) is listed only by crafted fragments, one per violation.
    Returns the items and {violation: fragment name}."""
    items = {"vae_encode": spec_items()["vae_encode"]}
    write_spec_store(root, items, per_shard=1, shards_per_fragment=1)
    stage_dir = root / "index" / "vae_encode"
    own = [p for p in stage_dir.glob("*.parquet") if pq.read_table(p).column("item_key").to_pylist() == [KEYS[4]]]
    (lone,) = own
    good_row = pq.read_table(lone).to_pylist()[0]
    lone.unlink()
    names = {}
    for n, violation in enumerate(violations):
        names[violation] = f"crafted-{n}.parquet"
        _violating(stage_dir, names[violation], violation, good_row)
    return items, names


@pytest.mark.parametrize("violation", VIOLATIONS)
def test_a_fragment_breaking_the_grammar_is_refused_whole_and_named(tmp_path, caplog, violation):
    items, names = _store_with_crafted(tmp_path / "src", [violation])
    name = names[violation]
    wanted = {k: p for k, _, p in items["vae_encode"]}

    store = open_store(str(tmp_path / "src"), create=False)
    with caplog.at_level(logging.WARNING, logger="sdxlpipe.store"):
        got = {k: store.read("vae_encode", k, "latent.safetensors") for k in wanted}
    # Whole: the fragment's intact row is not used either; the other fragments are.
    assert got == {**wanted, KEYS[4]: None}
    assert name in caplog.text and "refused" in caplog.text
    assert store.missing("vae_encode", list(wanted)) == [KEYS[4]]
    problems = store.verify()
    assert [p for p in problems if name in p["problem"]] and all(p["item_key"] is None for p in problems)

    dst = open_store(str(tmp_path / "dst"))
    report = store.copy_missing_to(dst)
    assert report["vae_encode"]["items"] == 4 and report["vae_encode"]["damaged"] == []
    dst.refresh()
    assert dst.missing("vae_encode", list(wanted)) == [KEYS[4]]
    assert dst.verify() == []


def test_store_commands_name_every_refused_fragment_and_never_crash(tmp_path):
    items, names = _store_with_crafted(tmp_path / "src", VIOLATIONS)
    # Folders that are not stage names (a notebook's checkpoints copied along): ignored, and listed.
    (tmp_path / "src" / "shards" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "src" / "index" / "not a stage").mkdir()
    verified = cli("store", "verify", "--store", str(tmp_path / "src"), "--json", check=False)
    assert verified.returncode == 1 and "Traceback" not in verified.stderr, verified.stderr
    problems = json.loads(verified.stdout)["problems"]
    assert sorted(n for n in names.values() if any(n in p["problem"] for p in problems)) == sorted(names.values())
    assert {p["stage"] for p in problems} == {"vae_encode", ".ipynb_checkpoints", "not a stage"}

    pulled = cli("store", "pull", str(tmp_path / "src"), str(tmp_path / "dst"), "--json", check=False)
    assert pulled.returncode == 0 and "Traceback" not in pulled.stderr, pulled.stderr
    assert all(n in pulled.stderr for n in names.values())
    assert json.loads(pulled.stdout)["vae_encode"]["items"] == 4
    du = cli("store", "du", "--store", str(tmp_path / "src"), "--json", check=False)
    assert du.returncode == 0 and json.loads(du.stdout)["stages"]["vae_encode"]["items"] == 4, du.stderr


# --- bad markers, manifests and FORMAT from elsewhere ----------------------------------------


MARKER_VIOLATIONS = ["unparsable", "missing column", "item_key not hex", "fragment is a path", "fragment null",
                     "fragment as integer", "shard_id as integer"]


@pytest.mark.parametrize("violation", MARKER_VIOLATIONS)
def test_a_marker_file_breaking_the_grammar_is_refused_whole_and_named(tmp_path, caplog, violation):
    items = {"vae_encode": spec_items()["vae_encode"]}
    (fragment,) = write_spec_store(tmp_path / "s", items, per_shard=5)["vae_encode"]
    shard_id = pq.read_table(tmp_path / "s" / "index" / "vae_encode" / fragment).column("shard_id")[0].as_py()
    # A valid marker of an intact item beside the violating one: refused whole, the item stays present.
    rows = {"item_key": [KEYS[0], KEYS[1]], "shard_id": [shard_id, shard_id], "fragment": [fragment, fragment]}
    path = tmp_path / "s" / "index" / "vae_encode" / "bad-0123456789abcdef.parquet"
    if violation == "unparsable":
        path.write_bytes(b"not parquet at all")
    else:
        if violation == "missing column":
            del rows["fragment"]
        elif violation == "item_key not hex":
            rows["item_key"][1] = "nothex"
        elif violation == "fragment is a path":
            rows["fragment"][1] = "../index/other.parquet"
        elif violation == "fragment null":
            rows["fragment"][1] = None
        elif violation == "fragment as integer":
            rows["fragment"] = [1, 2]
        elif violation == "shard_id as integer":
            rows["shard_id"] = [1, 2]
        pq.write_table(pa.table(rows), path)

    store = open_store(str(tmp_path / "s"), create=False)
    with caplog.at_level(logging.WARNING, logger="sdxlpipe.store"):
        assert store.missing("vae_encode", KEYS[:5]) == []
    assert path.name in caplog.text and "refused" in caplog.text
    assert [p for p in store.verify() if path.name in p["problem"]]
    assert store.read("vae_encode", KEYS[0], "latent.safetensors") == dict((k, p) for k, _, p in items["vae_encode"])[KEYS[0]]


MANIFEST_VIOLATIONS = {
    "not JSON": b"{not json", "a JSON list": b"[1,2]", "members missing": None, "bytes as text": None,
    "format 2": None, "xxh3 of another shard": None, "stage of another directory": None,
    "member with a negative offset": None, "deeply nested": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("violation", list(MANIFEST_VIOLATIONS))
def test_a_manifest_breaking_the_spec_is_reported_and_pull_writes_its_own(tmp_path, violation):
    items = {"vae_encode": spec_items()["vae_encode"]}
    write_spec_store(tmp_path / "src", items, per_shard=5)
    (manifest_path,) = (tmp_path / "src" / "shards" / "vae_encode").glob("*.json")
    doc = json.loads(manifest_path.read_bytes())
    raw = MANIFEST_VIOLATIONS[violation]
    if raw is None:
        if violation == "members missing":
            del doc["members"]
        elif violation == "bytes as text":
            doc["bytes"] = str(doc["bytes"])
        elif violation == "format 2":
            doc["format"] = 2
        elif violation == "xxh3 of another shard":
            doc["xxh3"] = "0" * 32
        elif violation == "stage of another directory":
            doc["stage"] = "text_encode"
        elif violation == "member with a negative offset":
            doc["members"][0]["offset"] = -512
        raw = _canonical(doc)
    manifest_path.write_bytes(raw)

    store = open_store(str(tmp_path / "src"), create=False)
    problems = store.verify()
    assert [p["shard_id"] for p in problems] == [manifest_path.stem] and "manifest" in problems[0]["problem"]
    copy = open_store(str(tmp_path / "dst"))
    assert store.copy_missing_to(copy)["vae_encode"]["shards"] == 1  # the shard itself is intact: copied whole
    copy.refresh()
    assert copy.verify() == []  # its manifest is its own, made from the index rows
    assert read_all(copy, items) == expected(items)


def test_a_format_line_other_than_the_specs_is_refused_with_an_error_not_a_traceback(tmp_path):
    write_spec_store(tmp_path / "s", {"vae_encode": spec_items()["vae_encode"]})
    for content in (b"sdxlpipe-store 2\n", b"sdxlpipe-store 1", b"\xff\xfe garbage", b""):
        (tmp_path / "s" / "FORMAT").write_bytes(content)
        with pytest.raises(StoreError, match="FORMAT"):
            open_store(str(tmp_path / "s"), create=False)
    proc = cli("store", "verify", "--store", str(tmp_path / "s"), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("Error:") and "Traceback" not in proc.stderr


# --- training from a store the spec's way -------------------------------------------------------


def _project(root: Path, store: Path | None = None) -> Path:
    """Six images of the bundled example, at the tiny model's smallest bucket: a run of seconds."""
    (root / "images").mkdir(parents=True)
    for image in sorted((EXAMPLE / "images").glob("00[0-5]_*.*")):
        shutil.copy(image, root / "images" / image.name)
    config = root / "sdxlpipe.toml"
    config.write_text("\n".join([
        'model = "tiny"', *([f'[store]\nurl = "{store}"'] if store else []),
        '[[sources]]', 'path = "images"', "[bucket]", "resolution = 64", "step = 32", "min_side = 64",
        "max_side = 128", "[vae_encode]", "flip_aug = true", "[train]", "rank = 4", "alpha = 8.0",
        "max_steps = 3", "batch_size = 2", "save_every_steps = 3", "caption_dropout = 0.2", ""]))
    return config


def _items_of(store_root: Path) -> dict[str, list[tuple[str, str, bytes]]]:
    """Every (key, field, payload) in a store's shards, read with tarfile alone."""
    items = {}
    for stage_dir in sorted((store_root / "shards").iterdir()):
        rows = items.setdefault(stage_dir.name, [])
        for shard in sorted(stage_dir.glob("*.tar")):
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    key, field = member.name.split(".", 1)
                    rows.append((key, field, tar.extractfile(member).read()))
    return items


def _adapter(report: dict) -> dict:
    from safetensors.torch import load_file

    (adapter,) = Path(report["outputs"]["checkpoint"]).glob("adapter.safetensors")
    return load_file(adapter)


@pytest.mark.slow  # two tiny encode+train runs through the CLI (~30 s)
def test_training_from_a_store_written_from_the_spec_gives_the_same_lora(tmp_path):
    import torch

    a = _project(tmp_path / "a")
    report_a = json.loads(cli("run", "train", "-c", str(a), "--json").stdout)
    store_a = Path(report_a["outputs"]["store"])
    items = _items_of(store_a)
    assert set(items) == {"vae_encode", "text_encode"} and len(items["vae_encode"]) == 12  # 6 images, flipped too
    store_b = tmp_path / "store-b"
    fragments = write_spec_store(store_b, items, per_shard=3, shards_per_fragment=2)
    assert len(fragments["vae_encode"]) == 2
    assert not set(p.name for p in store_a.rglob("*.tar")) & set(p.name for p in store_b.rglob("*.tar"))

    b = _project(tmp_path / "b", store=store_b)
    report_b = json.loads(cli("run", "train", "-c", str(b), "--json").stdout)
    # Every cached item came from B, found by its key; nothing was encoded again.
    assert {s: report_b["stages"][s]["computed"] for s in ("vae_encode", "text_encode")} == {
        "vae_encode": 0, "text_encode": 0}
    assert report_b["stages"]["train"]["computed"] == 1
    lora_a, lora_b = _adapter(report_a), _adapter(report_b)
    assert lora_a.keys() == lora_b.keys() and all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)
