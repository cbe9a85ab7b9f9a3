import xxhash

from sdxlpipe.pipeline.keys import canonical_json, item_key, partition_of


def test_item_key_ignores_dict_order_and_changes_with_any_value():
    a = item_key({"stage": "vae_encode", "crop": [0, 16], "vae": "abc"})
    b = item_key({"vae": "abc", "crop": [0, 16], "stage": "vae_encode"})
    c = item_key({"vae": "abd", "crop": [0, 16], "stage": "vae_encode"})
    assert a == b
    assert a != c
    # The spec's key: xxh3-128 hex of the canonical JSON, so other tools can compute it too.
    assert a == xxhash.xxh3_128_hexdigest('{"crop":[0,16],"stage":"vae_encode","vae":"abc"}'.encode())


def test_canonical_json_has_no_whitespace_and_sorted_keys():
    assert canonical_json({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'


def test_keys_written_by_earlier_versions_are_unchanged():
    # Every store item is found by this key: pinned as computed before the canonical JSON
    # helpers were folded into one (codec.canonical_json), unicode, floats and big ints included.
    doc = {"stage": "text_encode", "text": "café, 東京, \"q\"\n", "crop": [0, 16], "scale": 0.18215,
           "flip": True, "mask": None, "n": 10**20}
    assert item_key(doc) == "2fc3a2b552cc7945a40626fd09d8a530"


def test_partitions_cover_every_key_exactly_once():
    keys = [item_key({"i": i}) for i in range(400)]
    parts = [partition_of(k, 4) for k in keys]
    assert set(parts) == {0, 1, 2, 3}
    assert all(parts.count(p) > 50 for p in range(4))
