"""Given LoRA files laid out as other tools write them, `lora info` reports what is in them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sdxlpipe.lora.read import read_lora
from tests.conftest import cli


def rand(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("foreign")
    # sd-scripts (networks/lora.py, SDXL): SGM UNet names, lora_te1/lora_te2, fp16 weights and alphas,
    # one 3x3 conv module (conv_dim) and one at a different rank.
    kohya = {}
    for name, down, up, alpha in [
        ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", (8, 640), (640, 8), 4.0),
        ("lora_unet_output_blocks_2_1_proj_in", (8, 1280), (1280, 8), 4.0),
        ("lora_unet_input_blocks_1_0_in_layers_2", (4, 320, 3, 3), (320, 4, 1, 1), 1.0),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", (8, 768), (768, 8), 4.0),
        ("lora_te2_text_model_encoder_layers_0_mlp_fc1", (8, 1280), (5120, 8), 4.0),
    ]:
        kohya[f"{name}.lora_down.weight"] = rand(*down).half()
        kohya[f"{name}.lora_up.weight"] = rand(*up).half()
        kohya[f"{name}.alpha"] = torch.tensor(alpha).half()
    save_file(kohya, out / "kohya.safetensors", metadata={
        "ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4",
        "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "1"}), "ss_base_model_version": "sdxl_base_v1-0"})
    # LyCORIS LoHa (lycoris.kohya, algo=loha): hada_* factors and alpha.
    loha = {}
    for name, width in [("lora_unet_input_blocks_7_1_transformer_blocks_0_attn2_to_k", 2048),
                        ("lora_unet_middle_block_1_proj_out", 1280)]:
        loha.update({f"{name}.hada_w1_a": rand(1280, 16), f"{name}.hada_w1_b": rand(16, width),
                     f"{name}.hada_w2_a": rand(1280, 16), f"{name}.hada_w2_b": rand(16, width),
                     f"{name}.alpha": torch.tensor(8.0)})
    save_file(loha, out / "loha.safetensors", metadata={
        "ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "loha"})})
    # diffusers (StableDiffusionXLPipeline.save_lora_weights with adapter metadata): peft names under unet./text_encoder.
    diffusers = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": rand(4, 640),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": rand(640, 4),
        "unet.mid_block.attentions.0.proj_in.lora_A.weight": rand(2, 1280),
        "unet.mid_block.attentions.0.proj_in.lora_B.weight": rand(1280, 2),
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight": rand(4, 768),
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_B.weight": rand(768, 4),
    }
    adapter = {"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {"mid_block.attentions.0.proj_in": 2},
               "unet.alpha_pattern": {"mid_block.attentions.0.proj_in": 3},
               "text_encoder.r": 4, "text_encoder.lora_alpha": 16}
    save_file(diffusers, out / "diffusers.safetensors",
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(adapter)})
    # An older diffusers file without the adapter metadata: alpha is the rank.
    save_file({k: v for k, v in diffusers.items() if k.startswith("unet.down")}, out / "bare.safetensors")
    return out


def test_a_kohya_file_from_sd_scripts(files):
    info = read_lora(files / "kohya.safetensors").summary()
    assert (info["format"], info["network"]) == ("kohya", "locon")
    assert (info["modules"], info["unet_modules"], info["text_encoder_modules"], info["conv_modules"]) == (5, 3, 2, 1)
    assert info["ranks"] == [4, 8] and info["alphas"] == [1.0, 4.0]
    assert info["bytes"] == (files / "kohya.safetensors").stat().st_size
    assert info["metadata"]["ss_network_module"] == "networks.lora"


def test_a_lycoris_loha(files):
    info = read_lora(files / "loha.safetensors").summary()
    assert (info["format"], info["network"], info["modules"], info["unet_modules"]) == ("lycoris", "loha", 2, 2)
    assert info["ranks"] == [16] and info["alphas"] == [8.0]


def test_a_diffusers_file_takes_alpha_from_its_adapter_metadata(files):
    info = read_lora(files / "diffusers.safetensors").summary()
    assert (info["format"], info["network"]) == ("diffusers", "lora")
    assert (info["modules"], info["unet_modules"], info["text_encoder_modules"]) == (3, 2, 1)
    assert info["ranks"] == [2, 4] and info["alphas"] == [3.0, 8.0, 16.0]
    bare = read_lora(files / "bare.safetensors").summary()
    assert bare["alphas"] == [4.0]  # no metadata: diffusers loads it with alpha = rank


def test_lora_info_on_the_command_line(files, tmp_path):
    out = json.loads(cli("lora", "info", str(files / "kohya.safetensors"), "--json").stdout)
    assert {"format", "network", "modules", "unet_modules", "text_encoder_modules", "ranks", "alphas", "bytes",
            "metadata"} <= set(out)
    assert (out["format"], out["modules"], out["ranks"]) == ("kohya", 5, [4, 8])

    (tmp_path / "notes.safetensors").write_text("not a safetensors file")
    bad = cli("lora", "info", str(tmp_path / "notes.safetensors"), check=False)
    assert bad.returncode == 2
    assert "Error:" in bad.stderr and "notes.safetensors" in bad.stderr and "Hint:" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_lora_info_says_which_tools_load_each_layout_whole(files):
    """ComfyUI's comfy/lora.py model_lora_keys_unet maps a diffusers-named UNet module only as `unet.<name>` with
    `.to_q` spelt `.processor.to_q` (diffusers' old attention processors) and `.to_out.0` as `.processor.to_out`, and
    load_lora reads alpha only from `<module>.alpha` tensors; a peft-layout diffusers file has neither, so ComfyUI
    patches its other modules at scale 1 and reports success. `lora info` says where each file goes."""
    kohya, diffusers = (read_lora(files / n).summary() for n in ("kohya.safetensors", "diffusers.safetensors"))
    assert "ComfyUI" in kohya["loads_in"] and "A1111" in kohya["loads_in"] and kohya["not_for"] == ""
    assert "ComfyUI" not in diffusers["loads_in"] and diffusers["not_for"].startswith("not ComfyUI or A1111")
    out = cli("lora", "info", str(files / "diffusers.safetensors")).stdout
    assert "for:      diffusers, peft (not ComfyUI or A1111:" in out
