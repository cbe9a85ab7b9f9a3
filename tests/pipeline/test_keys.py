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


def test_keys_from_columns_are_the_per_row_keys_bit_for_bit():
    """vae_encode / text_encode compute keys from columns (keys.item_keys); each must equal
    item_key(key_doc(row)) for every row, also for values the template cannot take as they are."""
    import pyarrow as pa

    from sdxlpipe.pipeline.keys import item_keys
    from sdxlpipe.stages import text_encode, vae_encode

    n = 300
    table = pa.table({
        "content_hash": [xxhash.xxh3_128_hexdigest(str(i).encode()) for i in range(n)],
        "resize_w": [512 + 8 * i for i in range(n)], "resize_h": [1024 - i for i in range(n)],
        "crop_top": [i % 7 for i in range(n)], "crop_left": [0] * n,
        "bucket_w": [512 + 64 * (i % 9) for i in range(n)], "bucket_h": [2048 - 64 * (i % 5) for i in range(n)],
    })
    rows = table.to_pylist()
    params = vae_encode.Params()
    for flip in (False, True):
        for masks in ([None] * n, ["alpha"] * n, [f"file:{r['content_hash']}" if i % 3 else "full"
                                                 for i, r in enumerate(rows)]):
            expected = [item_key(vae_encode.key_doc(r, params, "vae:x%y", flip, m)) for r, m in zip(rows, masks)]
            assert vae_encode.keys_of(table, params, "vae:x%y", flip, masks) == expected

    texts = ["", "a photo", 'say "hi"', "back\\slash", "line\nbreak", "tab\t", "100% é 日本", "{a|b}", "%s %d"]
    fp = {k: f"{k}:fp" for k in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}
    tparams = text_encode.Params()
    expected = [item_key(text_encode.key_doc(t, tparams, fp)) for t in texts]
    assert text_encode.keys_of(texts, tparams, fp) == expected
    assert text_encode.keys_of(texts[:2] + texts[6:7], tparams, fp) == expected[:2] + expected[6:7]  # no escapes

    odd = [True, 1, 1.5, None, [1, "x"], {"b": 1, "a": 2}, "plain"]  # bool is not 1, floats, nesting
    flags = [i % 2 == 0 for i in range(7)]  # all bools: JSON true/false, not %d's 1/0
    assert item_keys({"k": "%"}, {"v": odd, "w": (list(range(7)), odd), "b": flags}) == \
        [item_key({"k": "%", "v": v, "w": [i, v], "b": b}) for i, (v, b) in enumerate(zip(odd, flags))]
