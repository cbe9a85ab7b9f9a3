"""Given captions, when text_encode runs, then every distinct text is in the store once."""

from __future__ import annotations

import pyarrow as pa
import torch

from sdxlpipe.cache_format import decode_tensors, open_store
from sdxlpipe.config import load_config
from sdxlpipe.pipeline.runner import run_pipeline
from sdxlpipe.pipeline.workspace import Workspace
from sdxlpipe.stages import text_encode
from tests.encode_data import make_dataset, tar_members


def test_identical_captions_are_encoded_once_and_the_empty_caption_too(tmp_path):
    cfg = load_config(make_dataset(tmp_path, 12))
    report = run_pipeline(cfg, "text_encode")
    # 12 images share 5 captions; plus the empty caption for dropout.
    assert report["stages"]["text_encode"]["computed"] == 6
    rows = Workspace(cfg.workspace).read_table("text_encode").to_pylist()
    assert len({r["text_key"] for r in rows}) == 5
    assert len({r["empty_text_key"] for r in rows}) == 1
    assert all(r["text_variant_keys"] == [r["text_key"]] for r in rows)
    members = tar_members(tmp_path / ".sdxlpipe" / "store", "text_encode")
    assert len(members) == len(set(members)) == 6
    data = open_store(cfg.store_url).read("text_encode", rows[0]["text_key"])
    tensors, _ = decode_tensors(data, "pt")
    assert tensors["prompt_embeds"].shape == (77, 96) and tensors["pooled_prompt_embeds"].shape == (32,)


class Ctx:
    """Just enough of the pipeline context to call the stage on a hand-made table."""

    def __init__(self, cfg, tmp_path):
        from sdxlpipe.pipeline.context import Context, Models
        from sdxlpipe.pipeline.hashing import ContentMemo
        from sdxlpipe.pipeline.progress import Reporter

        memo = ContentMemo(tmp_path / "memo.parquet")
        self.ctx = Context(config=cfg, store=open_store(cfg.store_url), workspace=Workspace(cfg.workspace),
                           memo=memo, reporter=Reporter(enabled=False), models=Models(cfg, memo), stage="text_encode")


def test_caption_variants_get_aligned_keys_and_shared_texts_are_stored_once(tmp_path):
    cfg = load_config(make_dataset(tmp_path, 0))
    table = pa.table({
        "caption": ["red, circle", "blue, square"],
        "caption_variants": pa.array([["red, circle", "circle, red"], ["blue, square", "red, circle"]],
                                     pa.list_(pa.string())),
    })
    ctx = Ctx(cfg, tmp_path).ctx
    out = text_encode.run(table, cfg.params["text_encode"], ctx).to_pylist()
    assert ctx.stats["text_encode"].computed == 4  # 3 distinct texts and the empty one
    a, b = out
    assert a["text_variant_keys"][0] == a["text_key"] == b["text_variant_keys"][1]
    assert len({a["text_variant_keys"][1], b["text_variant_keys"][0], a["text_key"]}) == 3
    assert len(ctx.store.present("text_encode")) == 4


def test_clip_skip_and_token_length_change_text_keys_and_no_latent(tmp_path):
    config = make_dataset(tmp_path, 4)
    base = run_pipeline(load_config(config), "encode")
    assert base["stages"]["text_encode"]["computed"] == 5
    skip = run_pipeline(load_config(config, ["text_encode.clip_skip=1"]), "encode")
    assert skip["stages"]["text_encode"]["computed"] == 5
    assert skip["stages"]["vae_encode"]["computed"] == 0
    cfg = load_config(config, ["text_encode.max_token_length=150"])
    long = run_pipeline(cfg, "encode")
    assert long["stages"]["text_encode"]["computed"] == 5
    key = Workspace(cfg.workspace).read_table("text_encode").column("text_key")[0].as_py()
    tensors, _ = decode_tensors(open_store(cfg.store_url).read("text_encode", key), "pt")
    assert tensors["prompt_embeds"].shape == (152, 96)
    assert torch.isfinite(tensors["prompt_embeds"]).all()
