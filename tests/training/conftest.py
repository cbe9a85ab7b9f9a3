"""A training workspace built by hand: random cached latents and text embeddings in a real store.

The train stage reads only the store and the table, so these tests do not
depend on the encode stages; the table has every column the
train stage reads (flip keys, caption variants, the empty caption, masks,
regularisation rows) when asked for.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pytest

from sdxlpipe.cache_format import encode_tensors, open_store
from sdxlpipe.config import load_config
from sdxlpipe.pipeline.context import Context, Models
from sdxlpipe.pipeline.hashing import ContentMemo
from sdxlpipe.pipeline.keys import xxh3_hex
from sdxlpipe.pipeline.progress import Reporter
from sdxlpipe.pipeline.workspace import Workspace
from sdxlpipe.stages import train as train_stage

# loader_workers 0: batches are read in the training thread; the tests of the streaming
# loader (test_stream.py, test_train_resume.py) use reader threads.
SMALL = dict(rank=4, alpha=8.0, batch_size=2, learning_rate=1e-3, max_steps=8, save_every_steps=4, max_checkpoints=2,
             loader_workers=0)


def make_context(root: Path, model: str = "tiny", store: str | None = None, device: str = "cpu",
                 **train_overrides) -> Context:
    """A workspace at root; `store`: a store URL instead of the workspace's own store; `device`: the config's."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    lines = [f'model = "{model}"', f'device = "{device}"', *([f'[store]\nurl = "{store}"'] if store else []),
             "[[sources]]", 'path = "images"', "[train]"]
    config_path = root / "sdxlpipe.toml"
    config_path.write_text("\n".join(lines) + "\n")
    config = load_config(config_path, [f"train.{k}={_toml(v)}" for k, v in train_overrides.items()])
    workspace = Workspace(config.workspace)
    memo = ContentMemo(workspace.memo_path)
    return Context(config=config, store=open_store(config.store_url), workspace=workspace, memo=memo,
                   reporter=Reporter(enabled=False), models=Models(config, memo), stage="train")


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (tuple, list)):
        return "[" + ",".join(_toml(x) for x in v) + "]"
    return repr(v)


def build_samples(ctx: Context, n: int = 6, *, size: int = 64, flips: bool = False, variants: int = 0,
                  masks: bool = False, reg: int = 0, seed: int = 0, shard_bytes: int = 256 << 20,
                  width: int | None = None, prefix: str = "") -> pa.Table:
    """n training rows (plus `reg` regularisation rows) of one bucket (size x size px, or width x size), their
    payloads in ctx.store (in shards of about `shard_bytes`); `prefix` names another set of samples."""
    import torch

    g = torch.Generator().manual_seed(seed)
    side, wide = size // 8, (width or size) // 8
    rows = []
    with ctx.store.writer("vae_encode", shard_bytes) as lw, ctx.store.writer("text_encode", shard_bytes) as tw:
        def text(name: str) -> str:
            key = xxh3_hex(prefix + name)  # store keys are xxh3-128 hex digests
            tw.add(key, "text.safetensors", encode_tensors({
                "prompt_embeds": torch.randn(77, 96, generator=g).half(),
                "pooled_prompt_embeds": torch.randn(32, generator=g).half()}))
            return key

        def latent(name: str) -> str:
            key = xxh3_hex(prefix + name)
            tensors = {"mean": (torch.randn(4, side, wide, generator=g) * 4).half(),
                       "std": torch.full((4, side, wide), 0.05).half()}
            if masks:
                m = torch.zeros(1, side, wide)
                m[:, : side // 2] = 1.0
                tensors["mask"] = m.half()
            lw.add(key, "latent.safetensors", encode_tensors(tensors, {"scaling_factor": "0.13025", "shift_factor": "0.0"}))
            return key

        empty = text("t-empty")
        for i in range(n + reg):
            rows.append({
                "key": f"{prefix}s{i}", "caption": f"a shape number {i}", "caption_variants": None,
                "latent_key": latent(f"l{i}"),
                "latent_flip_key": latent(f"lf{i}") if flips else None,
                "text_key": text(f"t{i}"),
                "text_variant_keys": [text(f"t{i}v{j}") for j in range(variants)] or None,
                "empty_text_key": empty, "repeats": 1, "is_reg": i >= n, "subset": "images",
                "width": width or size, "height": size, "resize_w": width or size, "resize_h": size,
                "crop_top": 0, "crop_left": 0, "bucket_w": width or size, "bucket_h": size,
            })
    return pa.Table.from_pylist(rows)


def params(**overrides) -> train_stage.Params:
    return dataclasses.replace(train_stage.Params(), **{**SMALL, **overrides})


def run_train(ctx: Context, table: pa.Table, p: train_stage.Params) -> dict:
    """The train stage as the runner calls it; returns the run's done.json."""
    import json

    train_stage.run(table, p, ctx)
    return json.loads((Path(ctx.outputs["train"]["dir"]) / "done.json").read_text())


@pytest.fixture
def workspace(tmp_path):
    return make_context(tmp_path / "ws")


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """Two torch threads on two shared cores run these tiny steps ~10x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
