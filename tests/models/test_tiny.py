"""Given the built-in tiny stack, when it is built, saved and loaded, then the weights agree everywhere."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from sdxlpipe.models.tiny import build_tiny_component, tiny_configs

# Prints one xxh3 per weight-bearing component of the tiny stack built with seed 0.
STATE_HASH = """
import json, sys, xxhash
from sdxlpipe.models.tiny import build_tiny_components

def state_hash(module):
    h = xxhash.xxh3_128()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()

parts = build_tiny_components(int(sys.argv[1]))
print(json.dumps({n: state_hash(parts[n]) for n in ("unet", "vae", "text_encoder", "text_encoder_2")}))
"""


def state_hash(module) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_same_seed_gives_the_same_weights_in_another_process(tiny_components):
    here = {n: state_hash(tiny_components[n]) for n in ("unet", "vae", "text_encoder", "text_encoder_2")}
    out = subprocess.run([sys.executable, "-c", STATE_HASH, "0"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def test_one_component_alone_matches_the_whole_stack_and_seeds_differ(tiny_components):
    assert state_hash(build_tiny_component("vae", seed=0)) == state_hash(tiny_components["vae"])
    assert state_hash(build_tiny_component("vae", seed=1)) != state_hash(tiny_components["vae"])


def test_building_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_component("text_encoder")
    assert torch.equal(torch.rand(3), expected)


def test_configs_are_plain_json_with_distinct_encoder_widths():
    configs = tiny_configs()
    assert json.loads(json.dumps(configs)) == configs
    assert configs["seed"] == 0
    te1, te2 = configs["text_encoder"], configs["text_encoder_2"]
    assert te1["hidden_size"] != te2["hidden_size"]
    assert configs["unet"]["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"]
    assert configs["unet"]["projection_class_embeddings_input_dim"] == 6 * 8 + te2["projection_dim"]


def test_vae_gives_finite_latents_at_one_eighth_size(tiny_components):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = tiny_components["vae"].encode(images).latent_dist.sample()
        decoded = tiny_components["vae"].decode(latents).sample
    assert latents.shape == (2, 4, 8, 8)
    assert torch.isfinite(latents).all() and torch.isfinite(decoded).all()


def test_tokenizer_2_pads_with_exclamation_mark(tiny_components):
    ids = tiny_components["tokenizer_2"]("a photo", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[-1] == tiny_components["tokenizer_2"].convert_tokens_to_ids("!")
    ids1 = tiny_components["tokenizer"]("a photo", padding="max_length", max_length=77).input_ids
    assert ids1[-1] == tiny_components["tokenizer"].eos_token_id


def test_saved_directory_loads_offline_and_generates(tiny_pipeline):
    images = tiny_pipeline(
        "a photo of a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (1, 64, 64, 3)
    assert (images >= 0).all() and (images <= 1).all()
