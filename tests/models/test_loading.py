"""Given a model spec, when components are loaded, then they match and come frozen."""

from __future__ import annotations

import pytest
import torch

from sdxlpipe.models.loading import (
    ModelError,
    load_noise_scheduler,
    load_pipeline,
    load_text_stack,
    load_unet,
    load_vae,
)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_saved_tiny_directory_loads_the_same_weights_as_tiny(tiny_dir):
    assert same_weights(load_unet(str(tiny_dir)), load_unet("tiny"))
    assert same_weights(load_vae(str(tiny_dir)), load_vae("tiny"))
    from_dir, from_tiny = load_text_stack(str(tiny_dir)), load_text_stack("tiny")
    for name in ("text_encoder", "text_encoder_2"):
        assert same_weights(from_dir[name], from_tiny[name])
    assert from_dir["tokenizer_2"]("a cat").input_ids == from_tiny["tokenizer_2"]("a cat").input_ids


def test_relative_directory_resolves_against_base_dir(tiny_dir):
    unet = load_unet(tiny_dir.name, base_dir=tiny_dir.parent)
    assert unet.config.cross_attention_dim == 96


def test_components_come_frozen_in_eval_mode_and_dtype():
    vae = load_vae("tiny", dtype="bfloat16")
    assert not vae.training
    assert not any(p.requires_grad for p in vae.parameters())
    assert next(vae.parameters()).dtype == torch.bfloat16
    stack = load_text_stack("tiny")
    assert not stack["text_encoder_2"].training


def test_a_vae_override_replaces_only_the_vae(tiny_dir, tmp_path):
    from sdxlpipe.models.tiny import build_tiny_component

    build_tiny_component("vae", seed=7).save_pretrained(tmp_path / "other-vae")  # a VAE repo: files at the root
    vae = load_vae("tiny", vae_override=str(tmp_path / "other-vae"))
    assert same_weights(vae, build_tiny_component("vae", seed=7))
    assert not same_weights(vae, load_vae("tiny"))


def test_noise_scheduler_is_ddpm_with_sdxl_values(tiny_dir):
    from diffusers import DDPMScheduler

    for spec in ("tiny", str(tiny_dir)):
        sched = load_noise_scheduler(spec)
        assert isinstance(sched, DDPMScheduler)
        assert sched.config.beta_schedule == "scaled_linear"
        assert (sched.config.beta_start, sched.config.beta_end) == (0.00085, 0.012)
        assert sched.config.num_train_timesteps == 1000 and sched.config.prediction_type == "epsilon"


def test_load_pipeline_from_tiny_or_its_directory_gives_the_same_image(tiny_dir):
    images = []
    for spec in ("tiny", str(tiny_dir)):
        pipe = load_pipeline(spec)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        images.append(pipe("a cat", num_inference_steps=2, height=64, width=64, generator=generator, output_type="np").images)
    assert images[0].shape == (1, 64, 64, 3)
    assert (images[0] == images[1]).all()


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.bin"])
def test_pickle_checkpoints_are_refused(tmp_path, name):
    (tmp_path / name).write_bytes(b"not really a pickle")
    with pytest.raises(ModelError) as err:
        load_unet(str(tmp_path / name))
    assert name in err.value.what and "--allow-pickle" in err.value.hint


def test_a_missing_spec_and_an_uncached_hub_id_say_how_to_fix_it(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError) as err:
        load_unet("someone/no-such-model")
    assert "someone/no-such-model" in err.value.what and "hf download someone/no-such-model" in err.value.hint
    with pytest.raises(ModelError, match="not found"):
        load_unet(str(tmp_path / "missing-dir" / "x"))


def test_a_broken_single_file_checkpoint_is_named_in_a_clear_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="model.safetensors.* not a readable .safetensors file") as err:
        load_unet(str(tmp_path / "model.safetensors"))
    assert "single-file" in err.value.hint
