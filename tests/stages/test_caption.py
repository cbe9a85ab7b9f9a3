"""Given booru-style captions, the caption stage writes a canonical caption and seeded variants."""

from __future__ import annotations

import pyarrow.parquet as pq

from sdxlpipe.config import load_config
from sdxlpipe.pipeline.runner import run_pipeline
from tests.datasets.files import image_bytes, write


def _run(tmp_path, captions: dict[str, str], caption_toml: str, overrides=None) -> dict[str, dict]:
    for i, (name, text) in enumerate(captions.items()):
        write(tmp_path / "images" / f"{name}.png", image_bytes("PNG", seed=i))
        (tmp_path / "images" / f"{name}.txt").write_text(text)
    cfg = tmp_path / "sdxlpipe.toml"
    cfg.write_text('model = "tiny"\n[[sources]]\npath = "images"\n[caption]\n' + caption_toml)
    config = load_config(cfg, overrides)
    report = run_pipeline(config, "caption")
    rows = pq.read_table(config.workspace / "tables" / "caption.parquet").to_pylist()
    return {r["source"].rsplit("/", 1)[1][:-4]: r for r in rows} | {"_report": report}


def test_nothing_randomised_gives_one_variant_equal_to_the_caption(tmp_path):
    rows = _run(tmp_path, {"a": "1girl, solo, smile"}, 'caption_prefix = "sks, "\n')
    assert rows["a"]["caption"] == "sks, 1girl, solo, smile"
    assert rows["a"]["caption_variants"] == ["sks, 1girl, solo, smile"]


def test_shuffle_keeps_the_first_tokens_and_the_prefix_and_is_seeded(tmp_path):
    tags = "char, 1girl, solo, smile, red hair, hat, outdoors, sky"
    toml = 'caption_prefix = "sks, "\nkeep_tokens = 1\nshuffle_tags = true\nvariants = 6\n'
    rows = _run(tmp_path, {"a": tags}, toml)
    row = rows["a"]
    assert row["caption"] == "sks, " + tags  # canonical: original order, no randomness
    assert len(row["caption_variants"]) == 6 and len(set(row["caption_variants"])) > 1
    for v in row["caption_variants"]:
        assert v.startswith("sks, char, ")
        assert sorted(v[len("sks, "):].split(", ")) == sorted(tags.split(", "))
    # The same data and settings give the same variants in a fresh workspace.
    again = _run(tmp_path / "again", {"a": tags}, toml)
    assert again["a"]["caption_variants"] == row["caption_variants"]
    other_seed = _run(tmp_path / "seed", {"a": tags}, toml, ["caption.seed=7"])
    assert other_seed["a"]["caption_variants"] != row["caption_variants"]


def test_tag_dropout_only_drops_flexible_tags(tmp_path):
    tags = ", ".join(f"t{i}" for i in range(20))
    rows = _run(tmp_path, {"a": tags}, "keep_tokens = 2\ntag_dropout = 0.5\nvariants = 4\n")
    for v in rows["a"]["caption_variants"]:
        kept = v.split(", ")
        assert kept[:2] == ["t0", "t1"] and 2 < len(kept) < 20
        assert [t for t in tags.split(", ") if t in kept] == kept  # order kept when not shuffling


def test_wildcards_pick_the_first_option_in_the_caption_and_all_options_across_variants(tmp_path):
    rows = _run(tmp_path, {"a": "a {red|green|blue} ball"}, "variants = 12\n")
    assert rows["a"]["caption"] == "a red ball"
    assert set(rows["a"]["caption_variants"]) == {"a red ball", "a green ball", "a blue ball"}


def test_tag_frequency_per_subset_for_export_metadata(tmp_path):
    from sdxlpipe.datasets.tags import tag_frequency

    rows = _run(tmp_path, {"a": "cat, sky", "b": "cat, tree", "c": "dog"}, "")
    subsets = [r["subset"] for k, r in rows.items() if k != "_report"]
    captions = [r["caption"] for k, r in rows.items() if k != "_report"]
    assert tag_frequency(subsets, captions) == {"images": {"cat": 2, "dog": 1, "sky": 1, "tree": 1}}


def test_changing_caption_settings_touches_only_the_caption_stage(tmp_path):
    _run(tmp_path, {"a": "x, y", "b": "z"}, "")
    run_pipeline(load_config(tmp_path / "sdxlpipe.toml"), "bucket")
    cfg = load_config(tmp_path / "sdxlpipe.toml", ["caption.caption_suffix=', best'"])
    again = run_pipeline(cfg, "bucket")["stages"]
    assert again["ingest"]["computed"] == 0 and again["bucket"]["computed"] == 0
    assert again["caption"]["computed"] == 2
