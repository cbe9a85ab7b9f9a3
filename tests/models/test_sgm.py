"""Given a UNet config, the SGM (original SDXL) names sdxlpipe derives are the ones diffusers' own
single-file converter reads back to the same modules: for the real SDXL UNet and for tiny."""

from __future__ import annotations

import pytest
import torch

from sdxlpipe.models.sgm import sgm_unet_name
from tests.models.sdxl_unet import SDXL_UNET, sdxl_unet_on_meta


def to_sgm_and_back(unet) -> tuple[dict, dict]:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state = unet.state_dict()
    sgm = {"model.diffusion_model." + sgm_unet_name(k, dict(unet.config)): v for k, v in state.items()}
    assert len(sgm) == len(state), "two diffusers weights got the same SGM name"
    return state, convert_ldm_unet_checkpoint(sgm, dict(unet.config))


def test_every_sdxl_unet_weight_has_the_sgm_name_diffusers_reads_back_to_it():
    unet = sdxl_unet_on_meta()
    state, back = to_sgm_and_back(unet)
    assert len(state) == 1680  # SDXL's UNet
    assert set(back) == set(state)
    assert all(back[k].shape == state[k].shape for k in state)


def test_sdxl_names_are_the_ones_kohya_writes():
    config = SDXL_UNET
    assert sgm_unet_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", config) == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert sgm_unet_name("down_blocks.2.attentions.1.proj_out", config) == "input_blocks.8.1.proj_out"
    assert sgm_unet_name("down_blocks.0.downsamplers.0.conv", config) == "input_blocks.3.0.op"
    assert sgm_unet_name("up_blocks.0.upsamplers.0.conv", config) == "output_blocks.2.2.conv"
    assert sgm_unet_name("up_blocks.1.upsamplers.0.conv", config) == "output_blocks.5.2.conv"
    assert sgm_unet_name("up_blocks.2.resnets.2.conv_shortcut", config) == "output_blocks.8.0.skip_connection"
    assert sgm_unet_name("mid_block.resnets.1.time_emb_proj", config) == "middle_block.2.emb_layers.1"
    assert sgm_unet_name("add_embedding.linear_2", config) == "label_emb.0.2"


def test_tiny_unet_round_trips_through_sgm_names_weight_for_weight():
    from sdxlpipe.models.tiny import build_tiny_component

    unet = build_tiny_component("unet")
    state, back = to_sgm_and_back(unet)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    # One layer per block: the indices are not SDXL's.
    assert sgm_unet_name("down_blocks.1.attentions.0.proj_in", dict(unet.config)) == "input_blocks.3.1.proj_in"


def test_a_name_outside_the_unet_layout_is_refused():
    with pytest.raises(KeyError, match="no place"):
        sgm_unet_name("controlnet_cond_embedding.conv_in", SDXL_UNET)
