"""The optional captioner, with a tiny randomly initialised BLIP built from config (no download)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sdxlpipe.cache_format import open_store
from sdxlpipe.config import load_config
from sdxlpipe.pipeline.runner import run_pipeline
from tests.datasets.files import image_bytes, write


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    d = tmp_path_factory.mktemp("blip")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "red", "blue", "square",
             "circle", "dog", "cat", "on", "the", "grass"]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(d / "vocab.txt"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = BlipConfig(
        text_config=dict(vocab_size=len(words), max_position_embeddings=64, bos_token_id=5, pad_token_id=0,
                         sep_token_id=3, eos_token_id=3, **small),
        vision_config=dict(image_size=32, patch_size=16, **small), projection_dim=32)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).eval().save_pretrained(d)
    processor.save_pretrained(d)
    return d


def _captioner_config(tmp_path, tiny_blip):
    """A config captioning tmp_path/images with the tiny BLIP (short captions: fast)."""
    cfg_path = tmp_path / "sdxlpipe.toml"
    cfg_path.write_text(f'model = "tiny"\n[[sources]]\npath = "images"\n'
                        f'[caption.captioner]\nmodel = "{tiny_blip}"\nmax_new_tokens = 6\n')
    return cfg_path


def _items(config) -> int:
    return open_store(config.store_url).du()["stages"].get("caption", {}).get("items", 0)


def test_captioner_fills_only_missing_captions_and_caches_by_image_model_and_prompt(tmp_path, tiny_blip):
    write(tmp_path / "images" / "has_caption.png", image_bytes("PNG", seed=1))
    (tmp_path / "images" / "has_caption.txt").write_text("a written caption")
    write(tmp_path / "images" / "IMG_0001.jpg", image_bytes("JPEG", seed=2))
    write(tmp_path / "images" / "IMG_0002.png", image_bytes("PNG", seed=3))
    cfg_path = _captioner_config(tmp_path, tiny_blip)
    config = load_config(cfg_path)

    run_pipeline(config, "caption")

    rows = {r["source"].rsplit("/", 1)[1]: r for r in
            pq.read_table(config.workspace / "tables" / "caption.parquet").to_pylist()}
    assert rows["has_caption.png"]["caption"] == "a written caption"
    for name in ("IMG_0001.jpg", "IMG_0002.png"):
        assert rows[name]["caption_origin"] == "captioner"
        assert rows[name]["caption"] and "IMG" not in rows[name]["caption"]
    assert _items(config) == 2

    run_pipeline(load_config(cfg_path), "caption")
    assert _items(config) == 2  # a rerun captions nothing again

    prompted = load_config(cfg_path, ["caption.captioner.prompt='a photo of'"])
    run_pipeline(prompted, "caption")
    assert _items(config) == 4  # a new prompt is a new item per image
    rows = pq.read_table(config.workspace / "tables" / "caption.parquet").to_pylist()
    assert all(r["caption"].startswith("a photo of") for r in rows if r["caption_origin"] == "captioner")


def test_a_rerun_and_status_open_no_caption_payload_and_a_fresh_checkout_reads_them_from_the_store(
        tmp_path, tiny_blip):
    write(tmp_path / "images" / "IMG_0001.jpg", image_bytes("JPEG", seed=2))
    write(tmp_path / "images" / "IMG_0002.png", image_bytes("PNG", seed=3))
    cfg_path = _captioner_config(tmp_path, tiny_blip)
    config = load_config(cfg_path)
    run_pipeline(config, "caption")
    table = config.workspace / "tables" / "caption.parquet"
    captions = pq.read_table(table).column("caption").to_pylist()
    # Scramble the caption payloads: a run that opened one would find it damaged and mark it bad.
    store_dir = Path(config.store_url)
    shards = list((store_dir / "shards" / "caption").glob("*.tar"))
    originals = {s: s.read_bytes() for s in shards}
    for shard in shards:
        shard.write_bytes(bytes(b ^ 0xFF for b in originals[shard]))

    from sdxlpipe.pipeline.status import status

    assert status(load_config(cfg_path), "caption")["stages"]["caption"]["to_compute"] == 0
    run_pipeline(load_config(cfg_path), "caption")

    assert list((store_dir / "index" / "caption").glob("bad-*")) == []
    assert pq.read_table(table).column("caption").to_pylist() == captions
    # Another checkout of the same store (no workspace table yet) reads the captions it lacks.
    for shard, data in originals.items():
        shard.write_bytes(data)
    (config.workspace / "tables" / "captioner.parquet").unlink()
    run_pipeline(load_config(cfg_path), "caption")
    assert pq.read_table(table).column("caption").to_pylist() == captions
    assert _items(config) == 2


def test_a_caption_payload_breaking_the_schema_is_refused_naming_it_not_captioned_again(tmp_path, tiny_blip):
    """A caption item that passes its checksum but is not {"caption": text} (docs/decisions.md 76)."""
    import json
    import shutil

    from tests.cache_format.test_conformance import _canonical, _items_of, write_spec_store
    from tests.conftest import cli

    write(tmp_path / "images" / "IMG_0001.jpg", image_bytes("JPEG", seed=2))
    cfg_path = _captioner_config(tmp_path, tiny_blip)
    config = load_config(cfg_path)
    run_pipeline(config, "caption")
    store_dir = Path(config.store_url)
    ((key, field, payload),) = _items_of(store_dir)["caption"]
    caption = json.loads(payload)["caption"]
    # The same store, written again by the spec-only writer with the item's JSON wrong (checksum right).
    shutil.rmtree(store_dir)
    write_spec_store(store_dir, {"caption": [(key, field, _canonical({"text": caption}))]})
    (config.workspace / "tables" / "captioner.parquet").unlink()  # so the run reads the store's items

    proc = cli("run", "caption", "-c", str(cfg_path), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    error = next(line for line in proc.stderr.splitlines() if line.startswith("Error:"))
    assert f"{store_dir}: caption item {key} breaks the payload schema" in error
    assert "not a JSON object with a text 'caption' member" in error
    assert f"store verify --repair --store {store_dir}" in proc.stderr
    assert _items(config) == 1  # refused, not captioned again
