"""An item that passes its checksum but breaks the payload schema (cache_format/README.md, Payloads)
is refused by every reader: `store verify` lists it (and marks it bad only with `--repair`), training
stops with one Error:/Hint: naming store, item, shard and problem (exit 2, no traceback), and nothing
is recomputed on its own (docs/decisions.md 76).

The stores are written by the spec-only writer of test_conformance, so each broken payload has a
correct checksum: what is wrong is the schema, never the bytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import xxhash

from sdxlpipe.cache_format import open_store
from tests.cache_format.test_conformance import _canonical, _items_of, _project, safetensors, write_spec_store
from tests.conftest import cli


def _parse(payload: bytes) -> tuple[dict, dict]:
    """A safetensors payload as {name: (dtype, shape, raw bytes)} and its metadata."""
    (size,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8:8 + size])
    meta = header.pop("__metadata__", {})
    data = payload[8 + size:]
    return {n: (s["dtype"], s["shape"], data[s["data_offsets"][0]:s["data_offsets"][1]]) for n, s in header.items()}, meta


def _with_header_entry(payload: bytes, name: str, value) -> bytes:
    """The payload with one more (non-tensor) entry in its JSON header: garbage the spec does not allow."""
    (size,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8:8 + size])
    header[name] = value
    text = _canonical(header)
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + payload[8 + size:]


def _break(payload: bytes, violation: str) -> bytes:
    tensors, meta = _parse(payload)
    if violation == "mean missing":
        del tensors["mean"]
    elif violation == "mean as int32":
        dtype, shape, raw = tensors["mean"]
        tensors["mean"] = ("I32", [shape[0], shape[1], shape[2] // 2], raw)  # the same bytes, 4 per element
        tensors["std"] = ("I32", tensors["mean"][1], tensors["std"][2])
    elif violation == "mean of rank 2":
        dtype, shape, raw = tensors["mean"]
        tensors["mean"] = (dtype, [shape[0], shape[1] * shape[2]], raw)
    elif violation == "latent shape not its bucket's":
        # Still [4, h, w] with mean and std agreeing: only the bucket (8 x 8 latents at 64 px) tells.
        for name in ("mean", "std"):
            dtype, shape, raw = tensors[name]
            tensors[name] = (dtype, [shape[0], shape[1] // 2, shape[2] * 2], raw)
    elif violation == "std unlike mean":
        dtype, shape, raw = tensors["std"]
        tensors["std"] = (dtype, [shape[0], shape[2], shape[1] * 2], raw + raw)
    elif violation == "extra tensor":
        tensors["junk"] = ("F16", [2], b"\0" * 4)
    elif violation == "scaling_factor not a number":
        meta = {**meta, "scaling_factor": "about 0.13"}
    elif violation == "garbage header entry":
        return _with_header_entry(payload, "junk", 5)
    elif violation == "pooled_prompt_embeds missing":
        del tensors["pooled_prompt_embeds"]
    elif violation == "prompt_embeds of rank 3":
        dtype, shape, raw = tensors["prompt_embeds"]
        tensors["prompt_embeds"] = (dtype, [1, *shape], raw)
    else:
        raise AssertionError(violation)
    return safetensors(tensors, meta or None)


# --- store verify, on a store of small made-up payloads ------------------------------------------

KEYS = [xxhash.xxh3_128_hexdigest(f"schema item {i}".encode()) for i in range(12)]
LATENT = safetensors({"mean": ("F16", [4, 2, 2], b"\1" * 32), "std": ("F16", [4, 2, 2], b"\2" * 32)},
                     {"scaling_factor": "0.13025", "shift_factor": "0.0"})
TEXT = safetensors({"prompt_embeds": ("F16", [3, 4], b"\3" * 24), "pooled_prompt_embeds": ("F16", [4], b"\4" * 8)})
# item -> (stage, field, payload, what the problem line must say); KEYS[0], [7] and [10] are intact.
BROKEN = {
    KEYS[1]: ("vae_encode", "mean missing", "tensor mean missing"),
    KEYS[2]: ("vae_encode", "mean as int32", "mean is I32, not a float type"),
    KEYS[3]: ("vae_encode", "mean of rank 2", "mean has shape [4, 4], the spec wants 3 dimensions"),
    KEYS[4]: ("vae_encode", "std unlike mean", "std has shape [4, 2, 4], mean [4, 2, 2]"),
    KEYS[5]: ("vae_encode", "extra tensor", "unexpected tensor junk"),
    KEYS[6]: ("vae_encode", "scaling_factor not a number", "metadata scaling_factor is 'about 0.13'"),
    KEYS[8]: ("text_encode", "garbage header entry", "header entry 'junk' is not a tensor"),
    KEYS[9]: ("text_encode", "prompt_embeds of rank 3", "prompt_embeds has shape [1, 3, 4]"),
}


def _schema_store(root: Path) -> None:
    items: dict[str, list] = {"vae_encode": [(KEYS[0], "latent.safetensors", LATENT)],
                              "text_encode": [(KEYS[7], "text.safetensors", TEXT)],
                              "caption": [(KEYS[10], "caption.json", _canonical({"caption": "a red square"})),
                                          (KEYS[11], "caption.json", _canonical({"text": "a red square"}))],
                              # Another stage's payloads are any bytes: not checked.
                              "other": [(KEYS[0], "latent.safetensors", b"anything at all")]}
    for key, (stage, violation, _) in BROKEN.items():
        good, field = (LATENT, "latent.safetensors") if stage == "vae_encode" else (TEXT, "text.safetensors")
        items[stage].append((key, field, _break(good, violation)))
    write_spec_store(root, items, per_shard=3)


def _shard_of(root: Path, stage: str, key: str) -> str:
    rows = [r for f in (root / "index" / stage).glob("from-elsewhere-*.parquet")
            for r in pq.read_table(f).to_pylist() if r["item_key"] == key]
    return rows[0]["shard_id"]


def test_verify_lists_each_item_breaking_the_payload_schema_and_repair_marks_them(tmp_path):
    root = tmp_path / "s"
    _schema_store(root)
    expected = {**BROKEN, KEYS[11]: ("caption", None, "not a JSON object with a text 'caption' member")}

    proc = cli("store", "verify", "--store", str(root), "--json", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    problems = json.loads(proc.stdout)["problems"]
    assert {p["item_key"] for p in problems} == set(expected), problems  # the intact and other-stage items pass
    for p in problems:
        stage, _, says = expected[p["item_key"]]
        assert p["stage"] == stage and p["shard_id"] == _shard_of(root, stage, p["item_key"])
        assert p["problem"].startswith("breaks the payload schema: ") and says in p["problem"], p
        assert p["problem"].endswith("`verify --repair` marks it bad")
    # Reported, not marked: a reader's judgement on bytes that pass their checksum changes nothing.
    store = open_store(str(root), create=False)
    assert not store.missing("vae_encode", KEYS[:7]) and not list(root.glob("index/*/bad-*.parquet"))

    text = cli("store", "verify", "--store", str(root), "--repair", check=False)
    assert text.returncode == 1 and "9 problem(s)" in text.stdout and text.stdout.count("; marked bad") == 9
    store = open_store(str(root), create=False)
    assert sorted(store.missing("vae_encode", KEYS[:7])) == sorted(KEYS[1:7])
    assert sorted(store.missing("text_encode", KEYS[7:10])) == sorted(KEYS[8:10])
    assert store.missing("caption", KEYS[10:12]) == [KEYS[11]]


# --- training, on real items of the tiny model ---------------------------------------------------

@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> dict[str, list[tuple[str, str, bytes]]]:
    """Every item an encode of the six-image project stores (12 latents, texts), read with tarfile."""
    root = tmp_path_factory.mktemp("encoded")
    config = _project(root / "a")
    report = json.loads(cli("run", "encode", "-c", str(config), "--json").stdout)
    return _items_of(Path(report["outputs"]["store"]))


def _train_from_broken(tmp_path: Path, encoded: dict, stage: str, violation: str) -> tuple[Path, Path, set[str]]:
    """A project whose store (written the spec's way) holds every encoded item, those of `stage` broken."""
    items = {s: [(k, f, _break(p, violation) if s == stage else p) for k, f, p in rows] for s, rows in encoded.items()}
    store = tmp_path / "store"
    write_spec_store(store, items, per_shard=4)
    return _project(tmp_path / "p", store=store), store, {k for k, _, _ in encoded[stage]}


def _refused(proc, store: Path, stage: str, keys: set[str], says: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    (at,) = [i for i, line in enumerate(lines) if line.startswith("Error:")]  # after the run's INFO lines
    error, hint = lines[at:at + 2]
    key = error.split(f"{stage} item ")[1].split()[0]
    assert key in keys and f"{store}: {stage} item {key} in shard {_shard_of(store, stage, key)} " in error, error
    assert "breaks the payload schema" in error and says in error, error
    assert hint.startswith("Hint:") and f"sdxlpipe store verify --repair --store {store}" in hint, hint


@pytest.mark.slow  # one encode (module fixture) and a tiny training start per case (~8 s each)
@pytest.mark.parametrize("stage,violation,says", [
    ("vae_encode", "mean missing", "tensor mean missing"),
    ("vae_encode", "latent shape not its bucket's", "mean has shape [4, 4, 16], its bucket 64x64 wants [4, 8, 8]"),
    ("text_encode", "garbage header entry", "header entry 'junk' is not a tensor"),
    ("text_encode", "prompt_embeds of rank 3", "the spec wants 2 dimensions"),
])
def test_training_refuses_an_item_breaking_the_schema_with_an_error_naming_it(tmp_path, encoded, stage,
                                                                               violation, says):
    config, store, keys = _train_from_broken(tmp_path, encoded, stage, violation)
    _refused(cli("run", "train", "-c", str(config), check=False), store, stage, keys, says)


@pytest.mark.slow  # three tiny training starts and an encode of 12 latents (~40 s)
def test_a_schema_breaking_item_is_never_recomputed_on_its_own_and_repair_re_encodes_it(tmp_path, encoded):
    config, store, keys = _train_from_broken(tmp_path, encoded, "vae_encode", "mean as int32")
    fragments = sorted(p.name for p in (store / "index").rglob("*.parquet"))
    for _ in range(2):  # the same refusal each time: nothing marked, nothing recomputed, no loop
        _refused(cli("run", "train", "-c", str(config), check=False), store, "vae_encode", keys, "mean is I32")
        assert sorted(p.name for p in (store / "index").rglob("*.parquet")) == fragments

    assert cli("store", "verify", "--store", str(store), "--repair", check=False).returncode == 1
    report = json.loads(cli("run", "train", "-c", str(config), "--json").stdout)
    assert report["stages"]["vae_encode"]["computed"] == len(keys) and report["stages"]["train"]["computed"] == 1
    assert cli("store", "verify", "--store", str(store), check=False).returncode == 0
