"""`status` says what changed since the last run, by setting and by weights."""

from __future__ import annotations

from safetensors.torch import load_file, save_file

from sdxlpipe.config import load_config
from sdxlpipe.models.tiny import save_tiny
from sdxlpipe.pipeline.runner import run_pipeline
from sdxlpipe.pipeline.status import format_status, status


def test_status_names_the_changed_setting_and_the_changed_rows(example):
    run_pipeline(load_config(example), "bucket")

    result = status(load_config(example, ["bucket.resolution=96"]), "bucket")

    reasons = result["stages"]["bucket"]["reasons"]
    assert reasons[0] == "bucket.resolution 128 -> 96"
    assert any(r.startswith("32 changed row(s): bucket_w") for r in reasons)
    assert result["stages"]["ingest"]["to_compute"] == 0
    assert "bucket.resolution 128 -> 96" in format_status(result)


def test_status_says_the_vae_weights_changed_and_nothing_else_is_stale(example, tmp_path):
    model = save_tiny(tmp_path / "tiny-model")
    vae_file = next((model / "vae").glob("*.safetensors"))
    weights = load_file(vae_file)
    name = sorted(weights)[0]
    weights[name] = weights[name] * 1.01  # a "new VAE": same shapes, other weights
    save_file(weights, vae_file)
    run_pipeline(load_config(example, ["train.max_steps=1"]), "text_encode")

    result = status(load_config(example, [f'vae="{model / "vae"}"', "train.max_steps=1"]), "text_encode")

    vae = result["stages"]["vae_encode"]
    assert vae["to_compute"] == vae["items"] == 32
    assert "vae weights changed" in vae["reasons"]
    assert result["stages"]["text_encode"]["to_compute"] == 0
