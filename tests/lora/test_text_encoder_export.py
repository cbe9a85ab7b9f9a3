"""Given a LoRA on the UNet and both text encoders, when it is exported, then each file reloads all three."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from sdxlpipe.lora.formats import save_diffusers_lora, save_kohya_lora
from tests.lora.test_formats import ALPHA, RANK, pipeline_with, unet_output

PROMPT = "a red cube on a blue floor"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def prompt_embeds(pipe) -> torch.Tensor:
    """The SDXL conditioning both encoders make: hidden states (CLIP-L and bigG side by side) and pooled."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    return torch.cat([embeds.flatten(), pooled.flatten()])


@pytest.fixture(scope="module")
def adapted(tiny_dir):
    """A tiny pipeline whose UNet and text encoders carry a non-zero LoRA (r=4, alpha=8)."""
    from peft import LoraConfig

    pipe = pipeline_with(tiny_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False,
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        for name in TEXT_ENCODERS:
            getattr(pipe, name).add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False,
                                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    return pipe


@pytest.fixture(scope="module")
def exported(adapted, tmp_path_factory):
    from peft.utils import get_peft_model_state_dict

    def part(model):
        return get_peft_model_state_dict(model, adapter_name="default"), model.peft_config["default"].to_dict()

    out = tmp_path_factory.mktemp("te-export")
    unet_state, unet_config = part(adapted.unet)
    text = {name: part(getattr(adapted, name)) for name in TEXT_ENCODERS}
    return {
        "diffusers": save_diffusers_lora(out / "lora.diffusers.safetensors", unet_state, unet_config, text_encoders=text),
        "kohya": save_kohya_lora(out / "lora.safetensors", unet_state, unet_config, text_encoders=text,
                                 unet_config=dict(adapted.unet.config)),
    }


def test_both_files_reload_the_text_encoders_and_the_unet_as_trained(adapted, exported, tiny_dir):
    base = pipeline_with(tiny_dir)
    from_kohya = pipeline_with(tiny_dir, exported["kohya"])
    from_diffusers = pipeline_with(tiny_dir, exported["diffusers"])

    trained = prompt_embeds(adapted)
    assert (trained - prompt_embeds(base)).abs().max() > 1e-2, "the LoRA must change the embeddings for this to mean anything"
    assert (prompt_embeds(from_kohya) - trained).abs().max() < 1e-5
    assert (prompt_embeds(from_diffusers) - trained).abs().max() < 1e-5
    assert (prompt_embeds(from_kohya) - prompt_embeds(from_diffusers)).abs().max() < 1e-5

    unet = unet_output(adapted.unet)
    assert (unet - unet_output(base.unet)).abs().max() > 1e-2
    assert (unet_output(from_kohya.unet) - unet).abs().max() < 1e-5
    assert (unet_output(from_diffusers.unet) - unet).abs().max() < 1e-5


def test_kohya_file_names_the_encoders_te1_and_te2_with_the_trained_alpha(exported):
    with safe_open(exported["kohya"], "pt") as f:
        keys = set(f.keys())
        alphas = {k: float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
        meta = f.metadata()
    for prefix in ("lora_te1", "lora_te2"):
        # The standard name, also for CLIP-L, whose `text_model.` transformers 5 no longer has.
        name = f"{prefix}_text_model_encoder_layers_0_self_attn_q_proj"
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}
    assert set(alphas.values()) == {ALPHA}
    assert meta["ss_network_train_unet_only"] == "False"


def test_diffusers_file_carries_each_encoders_config_under_its_prefix(exported):
    with safe_open(exported["diffusers"], "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert {k.split(".")[0] for k in keys} == {"unet", *TEXT_ENCODERS}
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    for prefix in ("unet", *TEXT_ENCODERS):
        assert (meta[f"{prefix}.r"], meta[f"{prefix}.lora_alpha"]) == (RANK, ALPHA)
    assert set(meta["text_encoder_2.target_modules"]) == {"q_proj", "k_proj", "v_proj", "out_proj"}


def test_an_unknown_encoder_name_is_refused():
    with pytest.raises(ValueError, match="text_encoder_3"):
        save_kohya_lora("unused.safetensors", {}, {"r": 4, "lora_alpha": 8}, text_encoders={"text_encoder_3": ({}, {})},
                        unet_config={})
