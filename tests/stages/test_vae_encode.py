"""Given a small dataset, when vae_encode runs, then the store holds what training needs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from sdxlpipe.cache_format import decode_tensors, open_store
from sdxlpipe.config import load_config
from sdxlpipe.pipeline.runner import run_pipeline
from tests.encode_data import make_dataset


def encode(config, *sets, target="vae_encode", **kw):
    cfg = load_config(config, list(sets))
    return cfg, run_pipeline(cfg, target, **kw)


def table(cfg, stage="vae_encode"):
    from sdxlpipe.pipeline.workspace import Workspace

    return Workspace(cfg.workspace).read_table(stage).to_pylist()


def latent(cfg, key):
    data = open_store(cfg.store_url).read("vae_encode", key)
    return decode_tensors(data, "pt")


def vae_of_tiny(pixels):
    from sdxlpipe.models.loading import load_vae

    with torch.no_grad():
        return load_vae("tiny").encode(pixels[None]).latent_dist


def test_each_image_stores_a_finite_distribution_at_latent_resolution(tmp_path):
    cfg, report = encode(make_dataset(tmp_path, 6))
    assert report["stages"]["vae_encode"]["computed"] == 6
    for row in table(cfg):
        tensors, meta = latent(cfg, row["latent_key"])
        shape = (4, row["bucket_h"] // 8, row["bucket_w"] // 8)
        assert tensors["mean"].shape == shape and tensors["std"].shape == shape
        assert tensors["mean"].dtype == torch.float16
        assert torch.isfinite(tensors["mean"]).all() and (tensors["std"] > 0).all()
        assert "mask" not in tensors
        assert float(meta["scaling_factor"]) == pytest.approx(0.13025)
        assert row["latent_flip_key"] is None


def test_flip_aug_stores_the_flipped_images_latent_beside_the_plain_one(tmp_path):
    from sdxlpipe.stages.vae_encode import load_pixels

    config = make_dataset(tmp_path, 4)
    cfg, plain = encode(config)
    cfg, flipped = encode(config, "vae_encode.flip_aug=true")
    # The plain latents are reused: turning flips on costs one encode per image.
    assert flipped["stages"]["vae_encode"]["computed"] == 4
    assert flipped["stages"]["vae_encode"]["reused"] == 4
    row = table(cfg)[0]
    assert row["latent_flip_key"] not in (None, row["latent_key"])
    want = vae_of_tiny(load_pixels(row).flip(-1))
    got, _ = latent(cfg, row["latent_flip_key"])
    assert torch.allclose(got["mean"].float(), want.mean[0], atol=2e-3)
    plain_mean, _ = latent(cfg, row["latent_key"])
    assert not torch.allclose(plain_mean["mean"], got["mean"])


def test_alpha_masks_are_stored_at_latent_resolution_and_flip_with_the_image(tmp_path):
    config = make_dataset(tmp_path, 0)
    im = Image.new("RGBA", (64, 64), (200, 30, 30, 255))
    im.paste((200, 30, 30, 0), (0, 0, 32, 64))  # left half transparent
    im.save(tmp_path / "images" / "half.png")
    cfg, report = encode(config, 'vae_encode.mask_from="alpha"', "vae_encode.flip_aug=true")
    (row,) = table(cfg)
    mask = latent(cfg, row["latent_key"])[0]["mask"]
    assert mask.shape == (8, 8)
    assert mask[:, :4].max() == 0 and mask[:, 4:].min() == 1
    flipped_mask = latent(cfg, row["latent_flip_key"])[0]["mask"]
    assert torch.equal(flipped_mask, mask.flip(-1))


def test_a_mask_folder_enters_the_key(tmp_path):
    config = make_dataset(tmp_path, 2)
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (64, 64), 255).save(masks / "000.png")
    cfg, _ = encode(config, f'vae_encode.mask_from="{masks}"')
    before = {r["source"]: r["latent_key"] for r in table(cfg)}
    Image.new("L", (64, 64), 0).save(masks / "000.png")
    cfg, report = encode(config, f'vae_encode.mask_from="{masks}"')
    assert report["stages"]["vae_encode"]["computed"] == 1
    after = {r["source"]: r["latent_key"] for r in table(cfg)}
    (changed,) = [s for s in after if after[s] != before[s]]
    assert changed.endswith("000.png")
    assert latent(cfg, after[changed])[0]["mask"].max() == 0


def broken_fp16_vae(directory):
    """The tiny VAE with a first conv so large that fp16 overflows (SDXL's VAE fails the same way)."""
    from sdxlpipe.models.tiny import build_tiny_component

    vae = build_tiny_component("vae")
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1e6)
    vae.save_pretrained(directory)
    return vae


def test_non_finite_fp16_latents_are_encoded_again_in_fp32(tmp_path, caplog):
    config = make_dataset(tmp_path, 4)
    vae32 = broken_fp16_vae(tmp_path / "vae")
    with caplog.at_level(logging.WARNING, logger="sdxlpipe"):
        cfg, report = encode(config, f'vae="{tmp_path / "vae"}"', 'vae_encode.dtype="float16"')
    assert report["stages"]["vae_encode"]["computed"] == 4
    assert "encoded again in float32" in caplog.text
    from sdxlpipe.stages.vae_encode import load_pixels

    for row in table(cfg):
        got, _ = latent(cfg, row["latent_key"])
        assert torch.isfinite(got["mean"]).all() and torch.isfinite(got["std"]).all()
        with torch.no_grad():
            want = vae32.encode(load_pixels(row)[None]).latent_dist.mean[0]
        assert torch.allclose(got["mean"].float(), want, rtol=1e-2, atol=1e-2)


def test_a_vae_from_a_single_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    from sdxlpipe.models.loading import load_vae
    from sdxlpipe.models.tiny import build_tiny_component

    other = build_tiny_component("vae", seed=7)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "my-vae.safetensors")
    loaded = load_vae("tiny", str(tmp_path / "my-vae.safetensors"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in other.state_dict().items())
    config = make_dataset(tmp_path / "data", 2)
    _, base = encode(config)
    _, swapped = encode(config, f'vae="{tmp_path / "my-vae.safetensors"}"')
    assert swapped["stages"]["vae_encode"]["computed"] == 2  # a new VAE: new latents
