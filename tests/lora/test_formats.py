"""Given a trained UNet LoRA, when it is exported, then every format reloads to the same UNet."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat

import pytest
import torch
from safetensors import safe_open

from sdxlpipe.lora.formats import save_diffusers_lora, save_kohya_lora
from tests.lora.conftest import unet_output

RANK, ALPHA = 4, 8  # as lora_unet in conftest.py; alpha != rank so scaling bugs show


@pytest.fixture(scope="module")
def exported(lora_unet, tmp_path_factory):
    from peft.utils import get_peft_model_state_dict

    out = tmp_path_factory.mktemp("export")
    state = get_peft_model_state_dict(lora_unet, adapter_name="default")
    config = lora_unet.peft_config["default"].to_dict()
    return {
        "diffusers": save_diffusers_lora(out / "diffusers", state, config),
        "kohya": save_kohya_lora(out / "kohya.safetensors", state, config, metadata={"ss_seed": 42},
                                 unet_config=dict(lora_unet.config)),
        "state": state,
    }


def pipeline_with(tiny_dir, lora_file=None):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir, local_files_only=True)
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_file))
    return pipe


def test_every_format_reloads_to_the_trained_unet(exported, lora_unet, tiny_dir):
    assert (lora_unet.peft_config["default"].r, lora_unet.peft_config["default"].lora_alpha) == (RANK, ALPHA)
    trained = unet_output(lora_unet)
    base = unet_output(pipeline_with(tiny_dir).unet)
    from_diffusers = unet_output(pipeline_with(tiny_dir, exported["diffusers"]).unet)
    from_kohya = unet_output(pipeline_with(tiny_dir, exported["kohya"]).unet)

    assert (trained - base).abs().max() > 1e-2, "the LoRA must change the output for this test to mean anything"
    assert (from_diffusers - trained).abs().max() < 1e-5
    assert (from_kohya - trained).abs().max() < 1e-5
    assert (from_kohya - from_diffusers).abs().max() < 1e-5


def test_diffusers_file_carries_the_trained_alpha(exported):
    with safe_open(exported["diffusers"], "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    assert exported["diffusers"].name == "pytorch_lora_weights.safetensors"
    assert meta["unet.r"] == RANK and meta["unet.lora_alpha"] == ALPHA
    assert all(k.startswith("unet.") for k in keys)


def test_kohya_file_has_kohya_keys_alpha_and_metadata(exported):
    with safe_open(exported["kohya"], "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        alphas = {k: f.get_tensor(k) for k in keys if k.endswith(".alpha")}
    assert all(k.startswith("lora_unet_") for k in keys)
    # SGM names as kohya writes them: tiny has 1 layer per block, so down_blocks.1.attentions.0 is
    # input_blocks.3.1 (SDXL's 2 layers per block make it input_blocks.4.1).
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_up.weight" in keys
    assert "lora_unet_output_blocks_0_0_in_layers_2.lora_down.weight" in keys  # up_blocks.0.resnets.0.conv1
    assert not [k for k in keys if "down_blocks" in k or "up_blocks" in k or "mid_block" in k]
    assert len(alphas) == len(exported["state"]) // 2
    assert all(float(a) == ALPHA for a in alphas.values())
    assert meta["ss_network_dim"] == str(RANK) and meta["ss_network_alpha"] == str(ALPHA)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_seed"] == "42"
    assert re.fullmatch(r"[0-9a-f]{64}", meta["sshs_model_hash"])  # kohya: bare hex; A1111 shows hash[0:12]
    assert re.fullmatch(r"[0-9a-f]{8}", meta["sshs_legacy_hash"])


def test_exported_files_are_readable_by_others_and_leave_no_temp_files(exported):
    expected = 0o666 & ~_umask()
    for name in ("diffusers", "kohya"):
        path = exported[name]
        assert stat.S_IMODE(os.stat(path).st_mode) == expected
        assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_kohya_export_refuses_dora(exported):
    with pytest.raises(ValueError, match="DoRA"):
        save_kohya_lora("unused.safetensors", exported["state"], {"r": 4, "lora_alpha": 8, "use_dora": True},
                        unet_config={})


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_read_lora_gives_back_a_peft_lora_with_the_trained_output(exported, lora_unet, fmt):
    """What training from an existing LoRA file (train.network_weights) relies on."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    from sdxlpipe.lora.read import peft_state, read_lora
    from sdxlpipe.models.loading import load_unet

    lora = read_lora(exported[fmt])
    unet = load_unet("tiny")
    state, config = peft_state(lora, "unet", unet)
    assert (config["r"], config["lora_alpha"]) == (RANK, ALPHA)
    unet.add_adapter(LoraConfig(**config))
    set_peft_model_state_dict(unet, state)
    assert (unet_output(unet) - unet_output(lora_unet)).abs().max() < 1e-5


def test_kohya_hashes_are_computed_as_kohya_does_on_a_file_over_one_mib():
    """sshs_legacy_hash reads the 64 KiB at 1 MiB, so only a file that large shows which header it hashed."""
    from sdxlpipe.lora.formats import kohya_hashes
    from safetensors.torch import save as safetensors_bytes

    tensors = {"lora_unet_x.lora_down.weight": torch.arange(600_000, dtype=torch.float32).reshape(1000, 600)}
    meta = {"ss_network_dim": "4", "ss_seed": "1", "modelspec.title": "x" * 5000, "sdxlpipe_config": "{}"}
    model_hash, legacy_hash = kohya_hashes(tensors, meta)
    # kohya's train_util.precalculate_safetensors_hashes: only the ss_* metadata, then
    # addnet_hash_safetensors (data after the header) and addnet_hash_legacy (64 KiB at 1 MiB).
    data = safetensors_bytes(tensors, metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    assert len(data) > 0x110000
    header = int.from_bytes(data[:8], "little")
    assert model_hash == hashlib.sha256(data[8 + header:]).hexdigest()
    assert legacy_hash == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
